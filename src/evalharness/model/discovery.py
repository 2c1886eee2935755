"""Which of a training run's artifacts is the model: the documented discovery order.

fastMONAI 0.12's MLflow callback logs ``model/best_model.safetensors``,
``model/final_model.safetensors`` and the fastai state dicts ``model/best_weights.pth``,
``model/final_weights.pth``; older notebooks log ``model/best_learner.pkl`` by hand. With
``model.artifact`` unset the harness takes, for ``model.role=best``: ``model/best_learner.pkl``,
``model/best_model.safetensors``, ``model/final_model.safetensors``, then the other loadable
files directly under ``model/`` (best-role names first, then by name). ``model.role=final`` takes
``model/final_learner.pkl``, ``model/final_model.safetensors``, then the other final-role files.
A bare state dict (``*.pth``, fastai ``learn.save``) carries no architecture: a safetensors
file beside it (the same role first) supplies one through its metadata
(`loaders.load_state_dict_with_metadata`). Pure functions on artifact paths: no MLflow.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

ROLES = ("best", "final")
MODEL_FOLDER = "model"
LOADABLE_SUFFIXES = (".pkl", ".safetensors", ".pth", ".pt", ".ckpt", ".bin", ".ts")
"""Suffixes of files under ``model/`` that may hold a network (the loader then reads content)."""
STATE_DICT_SUFFIX = ".pth"  # fastai `learn.save`: weights only, the architecture is elsewhere


@dataclass(frozen=True)
class ArtifactChoice:
    """The model artifact picked among a run's files, and a safetensors file to rebuild it."""

    artifact: str  # run-relative path, e.g. "model/best_model.safetensors"
    sibling: str | None  # run-relative safetensors path whose metadata gives the architecture
    reason: str  # one line: how it was chosen, for the console and the tags


def _role_of(path: str) -> str | None:
    name = posixpath.basename(path)
    return next((role for role in ROLES if name.startswith(f"{role}_")), None)


def discovery_order(role: str) -> tuple[str, ...]:
    """The fixed names tried first for `role`, in order."""
    if role not in ROLES:
        raise ValueError(f"role {role!r}: expected one of {', '.join(ROLES)}")
    if role == "best":
        return (
            "model/best_learner.pkl",
            "model/best_model.safetensors",
            "model/final_model.safetensors",
        )
    return ("model/final_learner.pkl", "model/final_model.safetensors")


def _other_candidates(paths: Sequence[str], role: str) -> list[str]:
    """Loadable files under model/ beyond the fixed names: the role's own first, then by name."""
    inside = [
        p
        for p in paths
        if p.startswith(f"{MODEL_FOLDER}/") and p.lower().endswith(LOADABLE_SUFFIXES)
    ]
    if role == "final":
        inside = [p for p in inside if _role_of(p) == "final"]
    else:
        inside = [p for p in inside if _role_of(p) != "final"]
    return sorted(inside, key=lambda p: (_role_of(p) != role, p))


def safetensors_sibling(paths: Sequence[str], artifact: str) -> str | None:
    """A safetensors file in the artifact's folder whose metadata can rebuild its architecture.

    For a ``.pth`` state dict only (fastai ``learn.save``); same role first
    (``best_weights.pth`` -> ``best_model.safetensors``), then any other.
    """
    if not artifact.lower().endswith(STATE_DICT_SUFFIX):
        return None
    folder = posixpath.dirname(artifact)
    found = [
        p for p in paths if posixpath.dirname(p) == folder and p.lower().endswith(".safetensors")
    ]
    role = _role_of(artifact)
    found.sort(key=lambda p: (_role_of(p) != role, p))
    return found[0] if found else None


def choose_model_artifact(paths: Sequence[str], role: str = "best") -> ArtifactChoice | None:
    """The model among a run's artifact files (run-relative paths), or None when none fits."""
    present = set(paths)
    fixed = [name for name in discovery_order(role) if name in present]
    if fixed:
        artifact = fixed[0]
        if _role_of(artifact) != role:
            reason = f"no {role}-role model in the run; took {artifact}"
        else:
            reason = f"first of the discovery order for model.role={role}"
        return ArtifactChoice(artifact, None, reason)
    others = _other_candidates(paths, role)
    if not others:
        return None
    artifact = others[0]
    sibling = safetensors_sibling(paths, artifact)
    reason = f"no fastMONAI learner or safetensors for model.role={role}; took {artifact}"
    if sibling:
        reason += f" with the architecture of {sibling}"
    return ArtifactChoice(artifact, sibling, reason)


def looked_for(role: str) -> str:
    """What discovery tries, for the error when nothing fits."""
    names = ", ".join(discovery_order(role))
    return f"{names}, then other {'/'.join(LOADABLE_SUFFIXES)} files under {MODEL_FOLDER}/"

"""nnU-Net v2 trained model folders: read, check and load them without running their code.

A trained model folder (``<results>/DatasetXXX_Name/<trainer>__<plans>__<configuration>/``)
holds ``plans.json``, ``dataset.json`` and ``fold_<k>/checkpoint_<name>.pth``. Each checkpoint
is a pickle (weights, optimizer state, ``init_args`` with the plans and a ``torch.device``):
it is read with the harness's restricted unpickler (`safe_pickle`), never plain ``torch.load``.
The folds evaluated together must agree with the folder's plans, configuration and labels;
every disagreement is one `SourceError` line before anything is built. Building the network
is `nnunet_network`'s job; what nnU-Net computes at inference is `predict.nnunet`'s.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evalharness.errors import SourceError
from evalharness.model.safe_pickle import load_model_pickle

PLANS = "plans.json"
DATASET_JSON = "dataset.json"
SPLITS = "splits_final.json"
DEFAULT_CHECKPOINT = "checkpoint_final.pth"
_FOLD = re.compile(r"fold_(\d+|all)$")
_FOLDER_NAME = re.compile(r"(?P<trainer>[^_].*?)__(?P<plans>.+?)__(?P<configuration>[^_].*)")


@dataclass(frozen=True)
class Fold:
    """One fold's checkpoint: its weights and what it says about itself."""

    name: str  # "0", "1", ... or "all"
    path: Path
    sha256: str
    weights: dict = field(repr=False)  # the state dict (aliased names kept as saved)
    trainer: str
    configuration: str
    mirror_axes: tuple[int, ...] | None  # inference_allowed_mirroring_axes (nnU-Net's order)


@dataclass(frozen=True)
class NnunetModel:
    """A trained model folder with the folds to evaluate, checked against each other."""

    folder: Path
    plans: dict = field(repr=False)
    dataset_json: dict = field(repr=False)
    configuration: str
    checkpoint: str
    folds: tuple[Fold, ...]

    @property
    def trainer(self) -> str:
        return self.folds[0].trainer

    @property
    def plans_name(self) -> str:
        return str(self.plans.get("plans_name", ""))

    @property
    def mirror_axes(self) -> tuple[int, ...] | None:
        return self.folds[0].mirror_axes

    @property
    def sha256(self) -> str:
        """One checksum for the folds together (the fold's own for a single fold)."""
        if len(self.folds) == 1:
            return self.folds[0].sha256
        joined = ",".join(f"{f.name}:{f.sha256}" for f in self.folds)
        return hashlib.sha256(joined.encode()).hexdigest()

    def tags(self) -> dict[str, str]:
        """What was evaluated, as run tags."""
        return {
            "evalharness.family": "nnunet",
            "evalharness.nnunet.trainer": self.trainer,
            "evalharness.nnunet.plans": self.plans_name,
            "evalharness.nnunet.configuration": self.configuration,
            "evalharness.nnunet.folds": ",".join(f.name for f in self.folds),
            "evalharness.nnunet.checkpoint": self.checkpoint,
            "evalharness.nnunet.checkpoint_sha256": ",".join(
                f"{f.name}:{f.sha256}" for f in self.folds
            ),
            "evalharness.nnunet.mirror_axes": ",".join(map(str, self.mirror_axes or ())),
            "evalharness.combine_rule": "mean of logits over mirrors and folds (nnU-Net)",
        }


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path, what: str) -> Any:
    """A JSON file, or one `SourceError` line naming it."""
    if not path.is_file():
        raise SourceError(f"{path}: not found (expected {what})")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(f"{path}: unreadable JSON ({' '.join(str(error).split())})") from None


def is_model_folder(names: Sequence[str]) -> bool:
    """Whether relative file names `names` of one folder look like a trained model folder:
    ``plans.json``, ``dataset.json`` and at least one ``fold_*/checkpoint_*.pth``."""
    present = set(names)
    has_fold = any(
        re.fullmatch(r"fold_(\d+|all)/checkpoint_[^/]+\.pth", n) is not None for n in present
    )
    return PLANS in present and DATASET_JSON in present and has_fold


def available_folds(folder: Path, checkpoint: str) -> list[str]:
    """The folds of `folder` that hold `checkpoint`, in nnU-Net's order (numbers, then all)."""
    found = [
        m.group(1)
        for p in folder.iterdir()
        if p.is_dir() and (m := _FOLD.fullmatch(p.name)) and (p / checkpoint).is_file()
    ]
    return sorted(found, key=lambda f: (f == "all", int(f) if f.isdigit() else 0))


def fold_names(folds: Any) -> list[str] | None:
    """`model.folds` as fold folder suffixes: None (every fold found), or a list of
    whole numbers / "all"."""
    if folds is None:
        return None
    items = list(folds) if isinstance(folds, (list, tuple)) else [folds]
    names = []
    for item in items:
        text = str(item).strip()
        if not (text.isdigit() or text == "all") or isinstance(item, bool):
            raise SourceError(f"model.folds={folds!r}: expected fold numbers like [0,1] or 'all'")
        names.append(str(int(text)) if text.isdigit() else text)
    if not names or len(set(names)) != len(names):
        raise SourceError(f"model.folds={folds!r}: expected distinct folds, at least one")
    return names


def _load_fold(folder: Path, name: str, checkpoint: str) -> tuple[Fold, dict]:
    """A fold's checkpoint, read with the restricted unpickler, and its ``init_args``."""
    path = folder / f"fold_{name}" / checkpoint
    if not path.is_file():
        has = ", ".join(available_folds(folder, checkpoint)) or "none"
        raise SourceError(
            f"{path}: not found (model.folds names fold {name}; folds with {checkpoint}: {has})"
        )
    state = load_model_pickle(path)
    if not isinstance(state, dict) or not isinstance(state.get("network_weights"), dict):
        raise SourceError(f"{path}: not an nnU-Net checkpoint (expected 'network_weights')")
    init_args = state.get("init_args") or {}
    axes = state.get("inference_allowed_mirroring_axes")
    return Fold(
        name=name,
        path=path,
        sha256=sha256_of(path),
        weights=state["network_weights"],
        trainer=str(state.get("trainer_name", "")),
        configuration=str(init_args.get("configuration", "")),
        mirror_axes=None if axes is None else tuple(int(a) for a in axes),
    ), init_args


def _check_fold(fold: Fold, init_args: dict, plans: dict, dataset_json: dict) -> None:
    """A fold must have been trained with the folder's plans, labels and a configuration the
    plans define."""
    if init_args.get("plans") is not None and init_args["plans"] != plans:
        raise SourceError(
            f"{fold.path}: its plans differ from {PLANS} of the model folder "
            "(expected a checkpoint trained with these plans)"
        )
    if fold.configuration not in plans.get("configurations", {}):
        raise SourceError(
            f"{fold.path}: configuration '{fold.configuration}' is not in {PLANS} "
            f"(it has: {', '.join(plans.get('configurations', {}))})"
        )
    named = _FOLDER_NAME.fullmatch(fold.path.parent.parent.name)
    if named is not None and named["configuration"] != fold.configuration:
        raise SourceError(
            f"{fold.path}: configuration '{fold.configuration}' differs from the model "
            f"folder's '{named['configuration']}' (<trainer>__<plans>__<configuration>)"
        )
    trained_labels = (init_args.get("dataset_json") or {}).get("labels")
    if trained_labels is not None and trained_labels != dataset_json.get("labels"):
        raise SourceError(
            f"{fold.path}: trained with labels {trained_labels}, but {DATASET_JSON} of the "
            f"model folder has {dataset_json.get('labels')} (expected the same label set)"
        )


def read_model_folder(
    folder: Path, folds: Any = None, checkpoint: str | None = None
) -> NnunetModel:
    """Read and check a trained model folder and the folds to evaluate (`model.folds`; None:
    every fold holding the checkpoint, as ``nnUNetv2_predict`` does), nothing partially loaded:
    every fold must match the folder's plans and labels, and the folds each other's trainer
    and configuration."""
    checkpoint = checkpoint or DEFAULT_CHECKPOINT
    if "/" in checkpoint or not checkpoint.endswith(".pth"):
        raise SourceError(
            f"model.checkpoint={checkpoint!r}: expected a file name like {DEFAULT_CHECKPOINT}"
        )
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise SourceError(f"model.path: {folder} is not a folder (expected a model folder)")
    plans = read_json(folder / PLANS, "the model folder's plans")
    dataset_json = read_json(folder / DATASET_JSON, "the model folder's dataset.json")
    names = fold_names(folds)
    if names is None:
        names = available_folds(folder, checkpoint)
        if not names:
            raise SourceError(f"{folder}: no fold_*/{checkpoint} (expected a trained fold)")
    loaded = []
    for name in names:
        fold, init_args = _load_fold(folder, name, checkpoint)
        _check_fold(fold, init_args, plans, dataset_json)
        loaded.append(fold)
    first = loaded[0]
    for fold in loaded[1:]:
        for what in ("trainer", "configuration"):
            if getattr(fold, what) != getattr(first, what):
                raise SourceError(
                    f"{fold.path}: {what} '{getattr(fold, what)}' differs from fold "
                    f"{first.name}'s '{getattr(first, what)}' (expected the folds of one model)"
                )
    return NnunetModel(folder, plans, dataset_json, first.configuration, checkpoint, tuple(loaded))


def agree(models: Sequence[NnunetModel]) -> None:
    """Models evaluated together (an ensemble of folders) need the same plans and labels."""
    first = models[0]
    for other in models[1:]:
        for what, a, b in (
            ("plans", first.plans, other.plans),
            ("labels", first.dataset_json.get("labels"), other.dataset_json.get("labels")),
        ):
            if a != b:
                raise SourceError(
                    f"{other.folder}: its {what} differ from {first.folder}'s "
                    "(expected an ensemble trained with the same plans and labels)"
                )


def find_splits(folder: Path) -> Path | None:
    """``splits_final.json`` beside a model folder: in it, in its dataset folder, or in the
    matching ``nnUNet_preprocessed/<dataset>/`` next to ``nnUNet_results`` (where nnU-Net
    keeps it)."""
    dataset_folder = folder.parent
    candidates = [
        folder / SPLITS,
        dataset_folder / SPLITS,
        dataset_folder.parent.parent / "nnUNet_preprocessed" / dataset_folder.name / SPLITS,
    ]
    return next((p for p in candidates if p.is_file()), None)

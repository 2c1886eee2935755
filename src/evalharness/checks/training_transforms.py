"""The training run's logged item transforms (fastMONAI's ``transformations`` param) against what
the evaluation reproduces. Pure functions: no MLflow, no files.

fastMONAI 0.12's MLflow callback logs every item transform of the training data loaders. Intensity
normalisation (ZNormalization, RescaleIntensity, Clamp) is reproduced at inference through
``preprocessing.normalization``; random augmentations (``Random*``, ``OneOf``) belong to training
only, as in fastMONAI's own inference. Any other transform (``PadOrCrop``, a custom class, ...)
changed what the model saw and the harness cannot redo it: an error naming it, never dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from evalharness.checks.mismatches import Mismatch, specs_text
from evalharness.config.values import format_value, normalize_spec
from evalharness.model.training_config import is_augmentation, normalization_spec

KEY = "training.transformations"


def _call_text(transform: Mapping[str, Any]) -> str:
    params = transform.get("params") or {}
    args = ", ".join(f"{k}={format_value(v)}" for k, v in params.items())
    return f"{transform['name']}({args})"


def transform_mismatches(
    transforms: Sequence[Mapping[str, Any]],
    training_normalization: Sequence[Mapping[str, Any]],
    normalization: Sequence[Mapping[str, Any]],
) -> list[Mismatch]:
    """Findings on the logged `transforms` (``{"name", "params"}`` each) given the training
    configuration's normalisation specs and the evaluation's effective `normalization`.

    An unreproducible non-random transform is an error. So is a logged intensity transform that
    neither the training configuration's normalisation lists nor the evaluation applies (one the
    training configuration lists is compared with the evaluation by the normalisation check).
    """
    out: list[Mismatch] = []
    listed = [normalize_spec(spec) for spec in training_normalization]
    applied = [normalize_spec(spec) for spec in normalization]
    for transform in transforms:
        name = str(transform["name"])
        if is_augmentation(name):
            continue
        spec = normalization_spec(transform)
        if spec is None:
            out.append(
                Mismatch(
                    "config",
                    KEY,
                    name,
                    None,
                    "error",
                    f"training applied {_call_text(transform)} (run param transformations), which "
                    "the harness cannot reproduce at inference: the model sees inputs unlike "
                    "those it was trained on",
                )
            )
        elif normalize_spec(spec) not in listed + applied:
            out.append(
                Mismatch(
                    "config",
                    KEY,
                    [normalize_spec(spec)],
                    applied,
                    "error",
                    f"training applied {specs_text([spec])} (run param transformations) but the "
                    f"evaluation normalises with {specs_text(applied)}",
                )
            )
    return out

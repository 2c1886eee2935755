"""The rules a setting's value must follow, each written once.

Every rule takes the config key (or training field) that the value came from, so its
`ConfigError` names it, and returns the value in the one form the code below uses. They check
the user's values up front (`config.validate`) and the values merged with the training
configuration (`config.settings`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from evalharness.errors import ConfigError

AGGREGATIONS = ("crop", "average", "hann", "gaussian")
DEVICES = ("auto", "cpu", "cuda")
DATA_LAYOUTS = ("demo", "decathlon", "csv", "nnunet")
MODEL_FAMILIES = ("nnunet", "bundle")
"""Besides null (model files and runs; a MONAI bundle found by its content): an nnU-Net model
folder (model=nnunet), a MONAI bundle (model=bundle)."""
SPLIT_METHODS = ("decathlon", "sklearn", "file", "all", "held_out")
MODEL_ROLES = ("best", "final")
MODEL_LOADING_OPTIONS = ("arch", "allow_globals", "trust_pickle", "trust_bundle")
"""The `model.*` keys that change what a model file loads into (cache keys include them)."""
CASE_ERROR_POLICIES = ("continue", "stop")
MISMATCH_POLICIES = ("warn", "error", "ignore")
DEMO_SIZES = ("demo", "tiny")
RESTORE_METHODS = ("probabilities", "labels", "bspline")  # predict/restore.py
DEFAULT_RESTORE = "bspline"
MISSING_POLICIES = ("nan", "worst")  # metrics.missing
MODEL_RUN_KEYS = ("run_id", "uri", "run_name")
"""The ways of naming a training run; at most one may be set."""
MODEL_MEMBER_KEYS = ("run_id", "uri", "path")
"""The model sources that may list several models: the members of an ensemble."""


def choice(key: str, value: Any, allowed: Sequence[str]) -> str:
    """`value` if it is one of `allowed`."""
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
    return value


def model_sources(key: str, value: Any) -> tuple[str, ...]:
    """The models `value` names: none (null), one (a string or a one-element list) or several
    (a list: an ensemble)."""
    if value is None:
        return ()
    if isinstance(value, str) and value:
        return (value,)
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and value
        and all(isinstance(v, str) and v for v in value)
    ):
        return tuple(value)
    raise ConfigError(
        f"{key}={value!r}: expected one model or a non-empty list of them (an ensemble)"
    )


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def patch_size_vox(key: str, size: Any) -> tuple[int, int, int]:
    """Three positive voxel counts."""
    values = list(size) if isinstance(size, Sequence) and not isinstance(size, str) else [size]
    if len(values) != 3 or not all(_is_whole(v) and v > 0 for v in values):
        raise ConfigError(
            f"{key}={size!r}: expected three positive integers (voxels), e.g. [96,96,64]"
        )
    return (values[0], values[1], values[2])


def overlap(key: str, value: Any, patch_size: Sequence[int] | None) -> Any:
    """fastMONAI's patch overlap: a fraction in [0, 1) of the patch, or whole voxels (one value
    or one per axis) smaller than the patch. Returned as given (`overlap_to_voxels` converts)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected a fraction in [0, 1) or voxels")
    if isinstance(value, float):
        if not 0.0 <= value < 1.0:
            raise ConfigError(
                f"{key}={value}: a fraction of the patch must lie in [0, 1) "
                "(give a whole number such as 16 for an overlap in voxels)"
            )
        return value
    voxels = list(value) if isinstance(value, Sequence) else [value]
    if not all(_is_whole(v) and v >= 0 for v in voxels):
        raise ConfigError(f"{key}={value!r}: expected a fraction in [0, 1) or whole voxels >= 0")
    if len(voxels) not in (1, 3):
        raise ConfigError(f"{key}={value!r}: expected one value or three (one per axis)")
    if patch_size is not None:
        per_axis = voxels * 3 if len(voxels) == 1 else voxels
        if any(v >= p for v, p in zip(per_axis, patch_size, strict=True)):
            raise ConfigError(
                f"{key}={value!r}: an overlap in voxels must be smaller than the patch "
                f"{list(patch_size)}"
            )
    return value


def overlap_to_voxels(value: Any, patch_size_vox: Sequence[int]) -> tuple[int, int, int]:
    """Per-axis even overlap in voxels of a valid `overlap`, as fastMONAI's
    `_normalize_patch_overlap` hands it to TorchIO's GridSampler: a scalar 0 < x < 1 is
    int(patch * x) per axis, any other scalar is voxels on every axis, a sequence gives one
    count per axis; odd counts lose one voxel (TorchIO needs even overlaps)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        voxels = [int(v) for v in value]
    elif 0 < float(value) < 1:
        voxels = [int(int(size) * float(value)) for size in patch_size_vox]
    else:
        voxels = [int(value)] * len(patch_size_vox)
    even = [v - v % 2 for v in voxels]
    return (even[0], even[1], even[2])


def spacing_mm(key: str, spacing: Any) -> tuple[float, float, float] | None:
    """None (native spacing) or three spacings > 0 mm."""
    if spacing is None:
        return None
    values = list(spacing) if isinstance(spacing, Sequence) else [spacing]
    if len(values) != 3 or not all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0
        for s in values
    ):
        raise ConfigError(f"{key}={spacing}: expected 3 values > 0 mm")
    return (float(values[0]), float(values[1]), float(values[2]))


def normalization_specs(key: str, specs: Any) -> tuple[dict, ...]:
    """A list of transform specs, each a mapping with a ``name``."""
    specs = specs or []
    if not isinstance(specs, Sequence) or not all(
        isinstance(spec, dict) and "name" in spec for spec in specs
    ):
        raise ConfigError(
            f"{key}={specs!r}: expected a list of transform specs like "
            '{"name": "ZNormalization", "masking_method": null}'
        )
    return tuple(dict(spec) for spec in specs)


def tta(key: str, value: Any) -> Any:
    """False, True (all 8 flips) or a list of axis sets drawn from 0, 1, 2."""
    if isinstance(value, bool):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str):
        for axes in value:
            items = list(axes) if isinstance(axes, Sequence) else [axes]
            if not all(_is_whole(a) and 0 <= a <= 2 for a in items):
                raise ConfigError(f"{key}={value!r}: axis sets may only hold the axes 0, 1, 2")
        return value
    raise ConfigError(
        f"{key}={value!r}: expected false, true or a list of axis sets like [[0],[1]]"
    )


def probability(key: str, value: Any) -> float:
    """A probability in [0, 1]."""
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"{key}={value}: expected a probability in [0, 1]")
    return float(value)


def positive_mb(key: str, value: float | None) -> float | None:
    """None or a size in MB > 0."""
    if value is not None and not value > 0:
        raise ConfigError(f"{key}={value}: expected > 0 (MB) or null")
    return value


def shard(key: str, value: Any) -> tuple[int, int]:
    """``"k/n"`` with whole numbers 0 <= k < n, as (k, n)."""
    text = str(value).strip()
    index, slash, count = text.partition("/")
    if slash and index.strip().isdigit() and count.strip().isdigit():
        k, n = int(index), int(count)
        if 0 <= k < n:
            return k, n
    raise ConfigError(f"{key}={value!r}: expected k/n with whole numbers 0 <= k < n, e.g. 0/4")

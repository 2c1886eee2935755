"""Configuration schema (registered in Hydra's ConfigStore) and validation of its values.

Keys left ``None`` under ``preprocessing``, ``patch`` and ``inference`` take the training
configuration's value; set, they override it (see `settings.py`). `validate` checks every value
that can be checked before any work starts and raises `ConfigError` naming the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from evalharness.errors import ConfigError

AGGREGATIONS = ("crop", "average", "hann", "gaussian")
DEVICES = ("auto", "cpu", "cuda")
DATA_LAYOUTS = ("demo", "decathlon", "csv")
SPLIT_METHODS = ("decathlon", "sklearn", "file", "all", "held_out")
MODEL_ROLES = ("best", "final")
CASE_ERROR_POLICIES = ("continue", "stop")
MISMATCH_POLICIES = ("warn", "error", "ignore")
DEMO_SIZES = ("demo", "tiny")


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None
    experiment: str = "evalharness"
    run_name: str | None = None


@dataclass
class ModelConfig:
    run_id: str | None = None
    artifact: str | None = None  # null: discovered among the run's artifacts (model.role)
    role: str = "best"
    config_artifact: str | None = None
    path: str | None = None
    uri: str | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    run_name: str | None = None
    allow_globals: list[str] = field(default_factory=list)
    trust_pickle: bool = False
    arch: Any = None
    cache_dir: str | None = None


@dataclass
class SplitConfig:
    method: str = "all"
    test_size: float | None = None
    random_state: int | None = None
    file: str | None = None
    column: str = "split"
    value: str = "test"


@dataclass
class DataConfig:
    name: str = "demo"
    root: str | None = None
    task: str | None = None
    manifest: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    case_column: str | None = None
    labels: Any = None
    limit: int | None = None
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class PreprocessingConfig:
    apply_reorder: bool | None = None
    target_spacing: list[float] | None = None
    normalization: Any = None
    padding_mode: Any = None


@dataclass
class PatchConfig:
    size: list[int] | None = None
    overlap: Any = None


@dataclass
class InferenceConfig:
    aggregation: str | None = None
    batch_size: int = 4
    device: str = "auto"
    amp: bool = False
    tta: Any = False
    keep_largest_component: bool | None = None
    threshold: float | None = None
    max_device_memory_mb: float | None = None


@dataclass
class OutputConfig:
    save_predictions: bool = False
    plots: bool = True


@dataclass
class RunConfig:
    on_case_error: str = "continue"
    resume: bool = True
    prefetch: bool = True


@dataclass
class ChecksConfig:
    on_mismatch: str = "warn"


@dataclass
class SweepConfig:
    resume: bool = True
    primary_metric: str = "dsc_mean"
    cache_mb: float = 2048.0  # in-process cache of the model and preprocessed cases; 0: off


@dataclass
class DemoConfig:
    size: str = "demo"
    cache_dir: str | None = None


@dataclass
class EvalConfig:
    mlflow: MlflowConfig = MISSING
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    preprocessing: PreprocessingConfig = MISSING
    patch: PatchConfig = MISSING
    inference: InferenceConfig = MISSING
    output: OutputConfig = field(default_factory=OutputConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checks: ChecksConfig = field(default_factory=ChecksConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


def register_configs() -> None:
    """Register the schema and the typed base of every config group.

    The bases are stored at the top level (``data_schema``, not ``data/data_schema``), so that
    `--help` lists only the options a user can choose in each group; an option file includes
    its base with ``- /data_schema@_here_`` in its defaults list.
    """
    store = ConfigStore.instance()
    store.store(name="eval_schema", node=EvalConfig)
    for group, node in (
        ("mlflow", MlflowConfig),
        ("model", ModelConfig),
        ("data", DataConfig),
        ("preprocessing", PreprocessingConfig),
        ("patch", PatchConfig),
        ("inference", InferenceConfig),
    ):
        store.store(name=f"{group}_schema", node=node)


def _choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")


def check_patch_size(key: str, size: Any) -> tuple[int, int, int]:
    """Three positive voxel counts, or ConfigError naming `key`."""
    values = list(size) if isinstance(size, Sequence) and not isinstance(size, str) else [size]
    if len(values) != 3 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values
    ):
        raise ConfigError(
            f"{key}={size!r}: expected three positive integers (voxels), e.g. [96,96,64]"
        )
    return (values[0], values[1], values[2])


def check_overlap(key: str, overlap: Any, patch_size: Sequence[int] | None) -> None:
    """A fraction in [0, 1), or whole voxels (one int or three) smaller than the patch."""
    if isinstance(overlap, bool):
        raise ConfigError(f"{key}={overlap!r}: expected a fraction in [0, 1) or voxels")
    if isinstance(overlap, float):
        if not 0.0 <= overlap < 1.0:
            raise ConfigError(
                f"{key}={overlap}: a fraction of the patch must lie in [0, 1) "
                "(give a whole number such as 16 for an overlap in voxels)"
            )
        return
    voxels = list(overlap) if isinstance(overlap, Sequence) else [overlap]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in voxels):
        raise ConfigError(f"{key}={overlap!r}: expected a fraction in [0, 1) or whole voxels >= 0")
    if len(voxels) not in (1, 3):
        raise ConfigError(f"{key}={overlap!r}: expected one value or three (one per axis)")
    if patch_size is not None:
        per_axis = voxels * 3 if len(voxels) == 1 else voxels
        if any(v >= p for v, p in zip(per_axis, patch_size, strict=True)):
            raise ConfigError(
                f"{key}={overlap!r}: an overlap in voxels must be smaller than the patch "
                f"{list(patch_size)}"
            )


def check_tta(key: str, tta: Any) -> None:
    """False, True (all 8 flips) or a list of axis sets drawn from 0, 1, 2."""
    if isinstance(tta, bool):
        return
    if isinstance(tta, Sequence) and not isinstance(tta, str):
        for axes in tta:
            items = list(axes) if isinstance(axes, Sequence) else [axes]
            if not all(isinstance(a, int) and 0 <= a <= 2 for a in items):
                raise ConfigError(f"{key}={tta!r}: axis sets may only hold the axes 0, 1, 2")
        return
    raise ConfigError(f"{key}={tta!r}: expected false, true or a list of axis sets like [[0],[1]]")


def validate(cfg: Any) -> None:
    """Check the values the user gave (before the training configuration is merged in)."""
    c = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    data, patch, inference = c["data"], c["patch"], c["inference"]
    _choice("data.name", data["name"], DATA_LAYOUTS)
    _choice("data.split.method", data["split"]["method"], SPLIT_METHODS)
    _choice("model.role", c["model"]["role"], MODEL_ROLES)
    _choice("inference.device", inference["device"], DEVICES)
    _choice("run.on_case_error", c["run"]["on_case_error"], CASE_ERROR_POLICIES)
    _choice("checks.on_mismatch", c["checks"]["on_mismatch"], MISMATCH_POLICIES)
    _choice("demo.size", c["demo"]["size"], DEMO_SIZES)
    if inference["aggregation"] is not None:
        _choice("inference.aggregation", inference["aggregation"], AGGREGATIONS)
    size = None
    if patch["size"] is not None:
        size = check_patch_size("patch.size", patch["size"])
    if patch["overlap"] is not None:
        check_overlap("patch.overlap", patch["overlap"], size)
    if inference["batch_size"] < 1:
        raise ConfigError(f"inference.batch_size={inference['batch_size']}: expected >= 1")
    check_tta("inference.tta", inference["tta"])
    memory_mb = inference["max_device_memory_mb"]
    if memory_mb is not None and not memory_mb > 0:
        raise ConfigError(f"inference.max_device_memory_mb={memory_mb}: expected > 0 (MB) or null")
    threshold = inference["threshold"]
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"inference.threshold={threshold}: expected a probability in [0, 1]")
    spacing = c["preprocessing"]["target_spacing"]
    if spacing is not None and (len(spacing) != 3 or any(s <= 0 for s in spacing)):
        raise ConfigError(f"preprocessing.target_spacing={spacing}: expected 3 values > 0 mm")
    if data["limit"] is not None and data["limit"] < 1:
        raise ConfigError(f"data.limit={data['limit']}: expected >= 1")

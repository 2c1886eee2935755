"""Everything an evaluation needs before its first case: sources, settings, cases, checks.

`plan` fetches the model file (cached) and the training configuration, merges the settings and
lists the cases: all that the configuration hash depends on, without loading the model, so a
sweep can skip a finished setting cheaply. `prepare` then loads the model, probes its channels
and runs the config checks. Neither writes to MLflow, so the shell can decide (resume, skip,
fail) before a run exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from evalharness.checks.config_checks import config_mismatches
from evalharness.checks.leakage import held_out_line, leakage_findings
from evalharness.checks.mismatches import Mismatch
from evalharness.checks.training_transforms import transform_mismatches
from evalharness.config.schema import EvalConfig, ModelConfig, as_dict
from evalharness.config.settings import EffectiveSettings, resolve_settings, stable_hash
from evalharness.config.validate import validate
from evalharness.data.datasets import Dataset, load_dataset
from evalharness.data.training_split import held_out_cases, training_split_of
from evalharness.model.loaders import LoadedModel, load_model_file, load_state_dict_with_metadata
from evalharness.model.sources import ResolvedModel, resolve_model
from evalharness.model.training_config import read_safetensors_metadata
from evalharness.predict.pipeline import probe_channels
from evalharness.predict.sliding_window import resolve_device


@dataclass
class Evaluation:
    """The resolved inputs of one evaluation (one configuration, one model, one case list)."""

    resolved: ResolvedModel
    loaded: LoadedModel
    settings: EffectiveSettings
    assumed: dict[str, Any]
    dataset: Dataset
    device: torch.device
    n_output_channels: int
    findings: list[Mismatch]
    config_hash: str
    labels: tuple[int, ...]  # the foreground labels scored (`foreground_labels`)
    n_input_channels: int = 1

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.network


@dataclass(frozen=True)
class Plan:
    """What decides an evaluation's configuration hash, found without loading the model."""

    resolved: ResolvedModel
    settings: EffectiveSettings
    assumed: dict[str, Any]
    dataset: Dataset
    config_hash: str
    split_findings: tuple[Mismatch, ...] = ()  # evaluated cases the training run used


ModelLoader = Callable[[ResolvedModel, ModelConfig], LoadedModel]


def load_resolved_model(resolved: ResolvedModel, source: ModelConfig) -> LoadedModel:
    """Load the resolved model file with the `model.*` loading options; a state dict with a
    safetensors sibling (and no `model.arch`) is rebuilt from the sibling's metadata."""
    if source.arch is None and resolved.sibling_metadata_path is not None:
        metadata = read_safetensors_metadata(resolved.sibling_metadata_path) or {}
        return load_state_dict_with_metadata(resolved.local_path, metadata)
    return load_model_file(
        resolved.local_path,
        arch=source.arch,
        allow_globals=list(source.allow_globals),
        trust_pickle=bool(source.trust_pickle),
    )


def plan(config: EvalConfig, tracking_uri: str) -> Plan:
    """Validate `config`, fetch the model file and the training config, merge settings, list
    cases and hash them (the configuration hash: effective settings, model checksum, cases)."""
    validate(config)
    cache_dir = Path(config.model.cache_dir or Path.cwd() / "outputs" / "cache" / "models")
    resolved = resolve_model(config.model, tracking_uri, cache_dir)
    print(f"model: {resolved.artifact_uri or resolved.local_path} ({resolved.artifact_reason})")
    settings, assumed, _ = resolve_settings(config, resolved.training_config.values)
    method = config.data.split.method
    split = training_split_of(
        resolved.training_split_path, resolved.training_run_id, resolved.split_version, method
    )
    dataset = load_dataset(config.data, partial(held_out_cases, split=split) if split else None)
    leaks = leakage_findings(dataset.cases, dataset.root, split) if split else []
    if split is not None and method == "held_out":
        print(held_out_line(len(dataset.cases), resolved.training_run_id, split.version))
    config_hash = stable_hash(
        {
            "settings": settings.as_params(),
            "model": resolved.sha256,
            "cases": [(c.case_id, str(c.image), str(c.label)) for c in dataset.cases],
            "metrics": as_dict(config.metrics),  # the rows differ by it
        }
    )
    return Plan(resolved, settings, assumed, dataset, config_hash, tuple(leaks))


def prepare(
    config: EvalConfig, planned: Plan, load_model: ModelLoader = load_resolved_model
) -> Evaluation:
    """After `plan(config, ...)`: load the model, probe its channels on the device and run the
    config checks. `load_model` is the injection point for a sweep's shared model cache."""
    loaded = load_model(planned.resolved, config.model)
    training = planned.resolved.training_config
    settings = planned.settings
    device = resolve_device(settings.device)
    loaded.network.to(device).eval()
    n_in, n_out = probe_channels(loaded.network, settings.patch_size_vox, device)
    findings = [*planned.split_findings]
    findings += config_mismatches(
        settings,
        training.values,
        training.source,
        planned.assumed,
        n_output_channels=n_out,
        dataset_labels=sorted(planned.dataset.label_names),
        output_contract=training.output,
    )
    findings += transform_mismatches(
        training.transforms, training.values.get("normalization") or [], settings.normalization
    )
    return Evaluation(
        resolved=planned.resolved,
        loaded=loaded,
        settings=settings,
        assumed=planned.assumed,
        dataset=planned.dataset,
        device=device,
        n_output_channels=n_out,
        findings=findings,
        config_hash=planned.config_hash,
        labels=tuple(foreground_labels(planned.dataset, n_out)),
        n_input_channels=n_in,
    )


def foreground_labels(dataset: Dataset, n_channels: int) -> list[int]:
    """Labels to score: the dataset's named foreground labels, else those the model outputs."""
    named = sorted(k for k in dataset.label_names if k != 0)
    if named:
        return named
    return [1] if n_channels == 1 else list(range(1, n_channels))


def run_tags(config: EvalConfig, ev: Evaluation) -> dict[str, str]:
    """Provenance tags of an evaluation run."""
    resolved = ev.resolved
    return {
        "evalharness.training_run_id": resolved.training_run_id or "",
        "evalharness.training_run_name": resolved.training_run_name or "",
        "evalharness.training_experiment": resolved.training_experiment or "",
        "evalharness.model_uri": resolved.artifact_uri or str(resolved.local_path),
        "evalharness.model_artifact": resolved.artifact or str(resolved.local_path),
        "evalharness.model_artifact_choice": resolved.artifact_reason,
        "evalharness.model_sha256": resolved.sha256,
        "evalharness.model_downloaded": str(resolved.downloaded).lower(),
        "evalharness.model_loader": ev.loaded.loader,
        "evalharness.trust_pickle": str(bool(config.model.trust_pickle)).lower(),
        "evalharness.training_config_source": resolved.training_config.source,
        "evalharness.training_config_fields": ", ".join(
            f"{k}={v}" for k, v in sorted(resolved.training_config.field_sources.items())
        )
        or "all from the source",
        "evalharness.training_split_version": resolved.split_version or "",
        "evalharness.assumed": ", ".join(sorted(ev.assumed)) or "none",
        "evalharness.config_hash": ev.config_hash,
        "evalharness.device": str(ev.device),
    }

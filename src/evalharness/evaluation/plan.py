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

from evalharness.checks.bundle_checks import bundle_findings, check_bundle_data
from evalharness.checks.config_checks import config_mismatches
from evalharness.checks.leakage import held_out_line, leakage_findings
from evalharness.checks.mismatches import Mismatch
from evalharness.checks.training_transforms import transform_mismatches
from evalharness.config.schema import EvalConfig, ModelConfig, as_dict
from evalharness.config.settings import EffectiveSettings, resolve_settings, stable_hash
from evalharness.config.validate import validate
from evalharness.data.datasets import Dataset, load_dataset
from evalharness.data.training_split import held_out_cases, training_split_of
from evalharness.errors import ConfigError
from evalharness.model.bundle_source import holds_bundle, resolve_bundle
from evalharness.model.loaders import LoadedModel, load_resolved_model
from evalharness.model.members import (
    agreed_training_config,
    check_agreement,
    member_configs,
    member_name,
)
from evalharness.model.sources import ResolvedModel, resolve_model
from evalharness.model.training_config import TrainingConfig
from evalharness.predict.bundle_transforms import BundleFamily
from evalharness.predict.channels import probe_channels
from evalharness.predict.ensemble import Ensemble
from evalharness.predict.family import ModelFamily
from evalharness.predict.sliding_window import resolve_device


@dataclass
class Evaluation:
    """The resolved inputs of one evaluation (one configuration, one model or ensemble, one
    case list). `resolved` and `loaded` are the first member; `members` and `loaded_members`
    all of them (one for a single model)."""

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
    members: tuple[ResolvedModel, ...] = ()
    loaded_members: tuple[LoadedModel, ...] = ()
    network: torch.nn.Module | None = None  # what the sliding window runs (an Ensemble or not)
    training: TrainingConfig | None = None  # the members' agreed training configuration
    family: ModelFamily | None = None  # a family's own inference (nnU-Net); None: the harness's

    @property
    def model(self) -> torch.nn.Module:
        return self.network if self.network is not None else self.loaded.network


@dataclass(frozen=True)
class Plan:
    """What decides an evaluation's configuration hash, found without loading the model.
    `resolved` is the first member of `members` (one model, or an ensemble's); `training` is
    their agreed training configuration."""

    resolved: ResolvedModel
    settings: EffectiveSettings
    assumed: dict[str, Any]
    dataset: Dataset
    config_hash: str
    members: tuple[ResolvedModel, ...] = ()
    training: TrainingConfig | None = None
    split_findings: tuple[Mismatch, ...] = ()  # evaluated cases the training run used
    family: Any = None  # a family's own model description (nnU-Net: its `NnunetModel`)


ModelLoader = Callable[[ResolvedModel, ModelConfig], LoadedModel]


def resolve_member(source: ModelConfig, tracking_uri: str, cache_dir: Path) -> ResolvedModel:
    """One model: a MONAI bundle (``model.family=bundle``, or with the family unset a folder or
    run found to hold one: `bundle_source.holds_bundle`), else a model file and its run."""
    if source.family == "bundle" or (source.family is None and holds_bundle(source, tracking_uri)):
        return resolve_bundle(source, tracking_uri, cache_dir)
    return resolve_model(source, tracking_uri, cache_dir)


def plan(config: EvalConfig, tracking_uri: str) -> Plan:
    """Validate `config`, fetch the model file and the training config, merge settings, list
    cases and hash them (the configuration hash: effective settings, model checksum, cases)."""
    validate(config)
    cache_dir = Path(config.model.cache_dir or Path.cwd() / "outputs" / "cache" / "models")
    members = tuple(
        resolve_member(member, tracking_uri, cache_dir) for member in member_configs(config.model)
    )
    for member in members:
        print(f"model: {member.artifact_uri or member.local_path} ({member.artifact_reason})")
    check_agreement(members)
    training = agreed_training_config(members)
    settings, assumed, _ = resolve_settings(config, training.values)
    resolved = members[0]  # the training split and its leakage: the first member's run
    method = config.data.split.method
    split = training_split_of(
        resolved.training_split_path, resolved.training_run_id, resolved.split_version, method
    )
    dataset = load_dataset(config.data, partial(held_out_cases, split=split) if split else None)
    leaks = leakage_findings(dataset.cases, dataset.root, split) if split else []
    if split is not None and method == "held_out":
        print(held_out_line(len(dataset.cases), resolved.training_run_id, split.version))
    shas = [m.sha256 for m in members]
    config_hash = stable_hash(
        {
            "settings": settings.as_params(),
            "model": shas[0] if len(shas) == 1 else shas,  # a single model: hashed as before
            "cases": [(c.case_id, str(c.image), str(c.label)) for c in dataset.cases],
            "metrics": as_dict(config.metrics),  # the rows differ by it
        }
    )
    return Plan(
        members[0], settings, assumed, dataset, config_hash, members, training, tuple(leaks)
    )


def model_label(members: tuple[ResolvedModel, ...]) -> str:
    """What a run's name says about its model: the training run's name (else its id's first 8
    characters), else the file's name; an ensemble's members joined by ``+``."""

    def one(member: ResolvedModel) -> str:
        if member.training_run_id:
            return member.training_run_name or member.training_run_id[:8]
        return member.local_path.name

    return "+".join(one(m) for m in members)


def prepare(
    config: EvalConfig, planned: Plan, load_model: ModelLoader = load_resolved_model
) -> Evaluation:
    """After `plan(config, ...)`: load the model, probe its channels on the device and run the
    config checks. `load_model` is the injection point for a sweep's shared model cache.
    An ensemble's members are loaded, moved to the device and probed one by one; they must
    have the same input and output channels."""
    members = planned.members or (planned.resolved,)
    training = planned.training or planned.resolved.training_config
    settings = planned.settings
    device = resolve_device(settings.device)
    loaded_members = []
    channels: list[tuple[int, int]] = []
    for resolved, member_config in zip(members, member_configs(config.model), strict=True):
        loaded = load_model(resolved, member_config)
        loaded.network.to(device).eval()
        channels.append(probe_channels(loaded.network, settings.patch_size_vox, device))
        loaded_members.append(loaded)
    _check_channels(members, channels)
    n_in, n_out = channels[0]
    networks = [m.network for m in loaded_members]
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
    family = None
    if planned.resolved.family == "bundle":
        contents, cases = planned.resolved.contents, planned.dataset.cases
        first_image = cases[0].image if cases else None
        names = planned.dataset.label_names
        check_bundle_data(contents.bundle, names, first_image, n_in, n_out)
        findings += bundle_findings(contents.contract, settings)
        memory_mb = config.inference.max_device_memory_mb
        family = BundleFamily(contents, networks[0], settings, device, n_out, memory_mb)
    return Evaluation(
        resolved=planned.resolved,
        loaded=loaded_members[0],
        settings=settings,
        assumed=planned.assumed,
        dataset=planned.dataset,
        device=device,
        n_output_channels=n_out,
        findings=findings,
        config_hash=planned.config_hash,
        labels=tuple(foreground_labels(planned.dataset, n_out)),
        n_input_channels=n_in,
        members=members,
        loaded_members=tuple(loaded_members),
        network=Ensemble(networks).eval() if len(networks) > 1 else networks[0],
        training=training,
        family=family,
    )


def _check_channels(members: tuple[ResolvedModel, ...], channels: list[tuple[int, int]]) -> None:
    """Every member must take the first member's input channels and give its outputs."""
    for member, (n_in, n_out) in zip(members[1:], channels[1:], strict=True):
        for key, first, value in (
            ("in_channels", channels[0][0], n_in),
            ("out_channels", channels[0][1], n_out),
        ):
            if value != first:
                raise ConfigError(
                    f"model.{key}: the ensemble's members disagree: {first} "
                    f"({member_name(members[0])}) vs {value} ({member_name(member)}); "
                    "expected members with the same inputs and outputs"
                )


def foreground_labels(dataset: Dataset, n_channels: int) -> list[int]:
    """Labels to score: the dataset's named foreground labels, else those the model outputs."""
    named = sorted(k for k in dataset.label_names if k != 0)
    if named:
        return named
    return [1] if n_channels == 1 else list(range(1, n_channels))


PROBABILITY_RULE = "mean of probabilities over flips and ensemble members (fastMONAI, MONAI)"


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
        "evalharness.training_config_source": (ev.training or resolved.training_config).source,
        "evalharness.training_config_fields": ", ".join(
            f"{k}={v}"
            for k, v in sorted((ev.training or resolved.training_config).field_sources.items())
        )
        or "all from the source",
        "evalharness.training_split_version": resolved.split_version or "",
        "evalharness.assumed": ", ".join(sorted(ev.assumed)) or "none",
        "evalharness.config_hash": ev.config_hash,
        "evalharness.device": str(ev.device),
        **ensemble_tags(ev),
        "evalharness.combine_rule": PROBABILITY_RULE,
        **(ev.family.tags() if ev.family is not None else {}),
    }


def ensemble_tags(ev: Evaluation) -> dict[str, str]:
    """`evalharness.ensemble_size` always; for an ensemble every member's run id, model URI,
    sha256 and loader, comma-separated in member order (the single-model tags describe the
    first member)."""
    members = ev.members or (ev.resolved,)
    tags = {"evalharness.ensemble_size": str(len(members))}
    if len(members) > 1:
        loaded = ev.loaded_members or (ev.loaded,)
        tags |= {
            "evalharness.ensemble_run_ids": ",".join(m.training_run_id or "" for m in members),
            "evalharness.ensemble_model_uris": ",".join(
                m.artifact_uri or str(m.local_path) for m in members
            ),
            "evalharness.ensemble_sha256": ",".join(m.sha256 for m in members),
            "evalharness.ensemble_loaders": ",".join(m.loader for m in loaded),
        }
    return tags

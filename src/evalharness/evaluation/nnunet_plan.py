"""`plan` and `prepare` for an nnU-Net model (``model=nnunet``): the model folder instead of a
training run, the plans instead of a training configuration, nnU-Net's inference per case.

The plans give the settings' training values (spacing, patch size, normalisation, step 0.5,
Gaussian blending), so the mismatch report compares the evaluation with them as it does with
a fastMONAI configuration; `patch.size` and `preprocessing.target_spacing` override the
configuration's when set (and are reported). The step size is ``1 - patch.overlap``, mirroring
is ``inference.tta``, ``inference.aggregation`` gaussian or average is nnU-Net's
``use_gaussian``. ``splits_final.json`` feeds the leakage check and ``held_out``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from evalharness.checks.config_checks import config_mismatches
from evalharness.checks.leakage import leakage_findings
from evalharness.config.schema import EvalConfig, as_dict
from evalharness.config.settings import EffectiveSettings, resolve_settings, stable_hash
from evalharness.config.validate import validate
from evalharness.data.cases import Case
from evalharness.data.datasets import load_dataset
from evalharness.data.nnunet_splits import read_splits
from evalharness.data.training_split import held_out_cases
from evalharness.errors import ConfigError
from evalharness.evaluation.plan import Evaluation, Plan, foreground_labels
from evalharness.model.loaders import LoadedModel
from evalharness.model.nnunet import NnunetModel, find_splits, read_model_folder
from evalharness.model.nnunet_network import build_fold_networks, require_nnunetv2
from evalharness.model.nnunet_run import fetch_run_folder
from evalharness.model.sources import ResolvedModel
from evalharness.model.training_config import TrainingConfig
from evalharness.predict.nnunet import (
    NnunetRunner,
    NnunetSettings,
    to_harness_axes,
    to_nnunet_axes,
)
from evalharness.predict.patch_outputs import ForwardCounts, OutputStore
from evalharness.predict.pipeline import CaseInputs, CasePrediction
from evalharness.predict.preprocess import PreprocessSettings
from evalharness.predict.sliding_window import resolve_device

SOURCE = "nnU-Net plans.json"
_NOT_APPLICABLE = ("preprocessing.apply_reorder", "preprocessing.normalization")


def is_nnunet(config: EvalConfig) -> bool:
    """Whether the configuration evaluates an nnU-Net model folder (``model=nnunet``)."""
    return config.model.family == "nnunet"


def plans_values(model: NnunetModel) -> dict[str, Any]:
    """The plans' configuration as training-configuration fields, in the harness's axes."""
    config = model.plans["configurations"][model.configuration]
    transpose = model.plans.get("transpose_forward", [0, 1, 2])
    masks = config.get("use_mask_for_norm") or [False] * len(config["normalization_schemes"])
    return {
        "patch_size": to_harness_axes(config["patch_size"], transpose),
        "target_spacing": to_harness_axes(config["spacing"], transpose),
        "patch_overlap": 0.5,  # nnUNetv2_predict's default step size 0.5
        "aggregation_mode": "gaussian",
        "apply_reorder": False,
        "keep_largest_component": False,
        "padding_mode": 0,  # nnU-Net pads images smaller than a tile with zeros
        "binary_threshold": 0.5,  # not used: nnU-Net decodes by argmax
        "normalization": [
            {"name": f"nnunet.{scheme}", "use_mask_for_norm": bool(mask)}
            for scheme, mask in zip(config["normalization_schemes"], masks, strict=False)
        ],
    }


def nnunet_settings(settings: EffectiveSettings) -> NnunetSettings:
    """nnU-Net's options from the effective settings; `ConfigError` for values it has none for."""
    overlap, tta, aggregation = settings.overlap, settings.tta, settings.aggregation
    if not isinstance(overlap, float) and overlap != 0:
        raise ConfigError(
            f"patch.overlap={overlap!r}: an nnU-Net model takes a fraction of the patch "
            "(step size = 1 - overlap), not voxels"
        )
    if not isinstance(tta, bool):
        raise ConfigError(
            f"inference.tta={tta!r}: an nnU-Net model mirrors over its checkpoint's "
            "inference_allowed_mirroring_axes; expected true or false"
        )
    if aggregation not in ("gaussian", "average"):
        raise ConfigError(
            f"inference.aggregation={aggregation}: an nnU-Net model blends tiles with its "
            "Gaussian (gaussian) or uniformly (average); expected one of them"
        )
    return NnunetSettings(
        step_size=1.0 - float(overlap),
        mirroring=tta,
        use_gaussian=aggregation == "gaussian",
        keep_largest_component=settings.keep_largest_component,
    )


def _model_source(config: EvalConfig, uri: str, cache_dir: Path) -> tuple[NnunetModel, dict]:
    """The model folder (by path, or found in a run), read and checked, and its provenance."""
    source = config.model
    if bool(source.path) == bool(source.run_id):
        raise ConfigError("model=nnunet: set one of model.path (a model folder) or model.run_id")
    if isinstance(source.path, (list, tuple)) or isinstance(source.run_id, (list, tuple)):
        raise ConfigError("model=nnunet: one model folder; an ensemble is model.folds=[0,1,...]")
    require_nnunetv2()
    if source.path:
        model = read_model_folder(Path(source.path), source.folds, source.checkpoint)
        splits = find_splits(model.folder)
        origin = {"run_id": None, "run_name": None, "experiment": None, "uri": None}
        return model, {**origin, "splits": splits, "downloaded": False, "reason": "model.path"}
    run_uri = str(source.tracking_uri or uri)
    fetched = fetch_run_folder(str(source.run_id), run_uri, cache_dir, source.artifact)
    model = read_model_folder(fetched.folder, source.folds, source.checkpoint)
    origin = {
        "run_id": fetched.run_id,
        "run_name": fetched.run_name,
        "experiment": fetched.experiment,
        "uri": f"runs:/{fetched.run_id}/{fetched.artifact}",
        "splits": fetched.splits,
        "downloaded": fetched.downloaded,
        "reason": "model.run_id (found by content)",
    }
    return model, origin


def plan_nnunet(config: EvalConfig, tracking_uri: str) -> Plan:
    """`evaluation.plan.plan` for ``model.family=nnunet``: the folder read and checked (no
    network built), the settings merged over the plans, the cases listed and hashed."""
    validate(config)
    for key in _NOT_APPLICABLE:
        group, name = key.split(".")
        if getattr(getattr(config, group), name) is not None:
            raise ConfigError(
                f"{key}: an nnU-Net model preprocesses as its plans say; expected null"
            )
    cache_dir = Path(config.model.cache_dir or Path.cwd() / "outputs" / "cache" / "models")
    model, origin = _model_source(config, tracking_uri, cache_dir)
    values = plans_values(model)
    training = TrainingConfig(values=values, source=SOURCE)
    settings, assumed, _ = resolve_settings(config, values)
    nnunet_settings(settings)
    splits_path = Path(config.model.splits) if config.model.splits else origin["splits"]
    split = read_splits(splits_path, [f.name for f in model.folds]) if splits_path else None
    if config.data.split.method == "held_out" and split is None:
        raise ConfigError(
            "data.split.method=held_out: no splits_final.json beside the model folder "
            f"{model.folder} (set model.splits)"
        )
    dataset = load_dataset(config.data, partial(held_out_cases, split=split) if split else None)
    leaks = leakage_findings(dataset.cases, dataset.root, split) if split else []
    if split is not None and config.data.split.method == "held_out":
        n = len(dataset.cases)
        print(f"held-out split: {n} case(s) that no evaluated fold used ({split.source})")
    resolved = ResolvedModel(
        local_path=model.folder,
        sha256=model.sha256,
        artifact_uri=origin["uri"],
        training_run_id=origin["run_id"],
        training_run_name=origin["run_name"],
        training_experiment=origin["experiment"],
        training_config=training,
        downloaded=origin["downloaded"],
        artifact=origin["uri"] and origin["uri"].split("/", 3)[-1],
        artifact_reason=origin["reason"],
    )
    config_hash = stable_hash(
        {
            "family": "nnunet",
            "settings": settings.as_params(),
            "model": model.sha256,
            "folds": [f.name for f in model.folds],
            "cases": [(c.case_id, str(c.image), str(c.label)) for c in dataset.cases],
            "metrics": as_dict(config.metrics),
        }
    )
    return Plan(
        resolved,
        settings,
        assumed,
        dataset,
        config_hash,
        members=(resolved,),
        training=training,
        split_findings=tuple(leaks),
        family=model,
    )


@dataclass
class NnunetFamily:
    """`evaluation.plan.ModelFamily` for nnU-Net: its preprocessing and inference per case."""

    runner: NnunetRunner
    options: NnunetSettings
    device: torch.device
    name: str = "nnunet"
    combine_rule: str = "logits"

    def load_inputs(self, case: Case, settings: PreprocessSettings) -> CaseInputs:
        return self.runner.load_inputs(case)

    def inputs_key(self) -> str:
        model = self.runner.model
        configuration = model.plans["configurations"][model.configuration]
        return stable_hash({"plans": configuration, "dataset": model.dataset_json})

    def forward_key(self, model_key: str) -> str:
        """The patch outputs depend on the folds and the device; the step size and mirroring
        only decide which patches run (a patch is found by its fold and input bytes)."""
        return stable_hash({"model": model_key, "device": str(self.device), "family": self.name})

    def predict(
        self,
        inputs: CaseInputs,
        keep_probabilities: bool,
        outputs: OutputStore | None,
        counts: ForwardCounts | None,
    ) -> CasePrediction:
        return self.runner.predict(
            inputs, self.options, self.device, keep_probabilities, outputs, counts
        )

    def tags(self) -> dict[str, str]:
        return {
            **self.runner.model.tags(),
            "evalharness.nnunet.step_size": str(self.options.step_size),
            "evalharness.nnunet.mirroring": str(self.options.mirroring).lower(),
        }


def prepare_nnunet(config: EvalConfig, planned: Plan) -> Evaluation:
    """After `plan_nnunet`: build the folds' networks (allowed classes only), move them to the
    device and compare the settings with the plans."""
    model: NnunetModel = planned.family
    settings = planned.settings
    transpose = model.plans.get("transpose_forward", [0, 1, 2])
    networks = build_fold_networks(model, list(config.model.allow_globals))
    spacing = settings.target_spacing_mm
    runner = NnunetRunner(
        model,
        networks,
        patch_size=to_nnunet_axes(settings.patch_size_vox, transpose),
        spacing=None if spacing is None else to_nnunet_axes(spacing, transpose),
    )
    device = resolve_device(settings.device)
    runner.network.to(device).eval()
    n_out = int(runner.label_manager.num_segmentation_heads)
    training = planned.training or planned.resolved.training_config
    findings = [*planned.split_findings]
    findings += config_mismatches(
        settings,
        training.values,
        training.source,
        planned.assumed,
        n_output_channels=n_out,
        dataset_labels=sorted(planned.dataset.label_names),
    )
    architecture = model.plans["configurations"][model.configuration].get("architecture", {})
    loaded = LoadedModel(
        network=runner.network,
        loader="nnunet_checkpoint",
        inference_config=None,
        arch={"class": architecture.get("network_class_name")},
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
        n_input_channels=runner.n_channels,
        members=(planned.resolved,),
        loaded_members=(loaded,),
        network=runner.network,
        training=training,
        family=NnunetFamily(runner, nnunet_settings(settings), device),
    )

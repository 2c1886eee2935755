"""A case through an nnU-Net model exactly as ``nnUNetv2_predict`` runs it.

nnU-Net's own code does what defines its behaviour: its image reader, its preprocessor
(transpose, crop to the non-zero region, per-channel normalisation from the plans,
resampling to the configuration's spacing), its sliding window (tile positions for a step
size, Gaussian importance map, half-precision accumulation), its mirroring over the
checkpoint's ``inference_allowed_mirroring_axes``, its mean of **logits** over mirrors and
folds, and its export back to the native grid (resampling the logits, pasting into the crop
box, transposing back). The harness supplies the networks (`model.nnunet_network`), counts
the forward passes and lets settings share them: `FoldNetworks` sits in nnU-Net's network
slot, one fold active at a time, and serves a patch it has already run (same fold, same
input bytes) from a sweep's store instead of running it again.

Axis orders: nnU-Net's arrays are SimpleITK's ``[C, z, y, x]`` (transposed by the plans'
``transpose_forward``); the harness's native arrays are nibabel's ``[X, Y, Z]``, the reverse.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import torch

from evalharness.data.datasets import Case
from evalharness.data.nifti_io import load_label
from evalharness.errors import CaseError, ConfigError
from evalharness.model.nnunet import NnunetModel
from evalharness.predict.patch_outputs import ForwardCounts, OutputStore, PatchOutputs
from evalharness.predict.pipeline import CaseInputs, CasePrediction, check_same_grid
from evalharness.predict.preprocess import PreparedImage, native_grid

READERS = ("SimpleITKIO", "NibabelIO")
"""Readers whose arrays are the reverse of nibabel's index order (the native grid)."""


def quiet_import() -> None:
    """Import nnunetv2's path module once without its prints about unset nnUNet_* folders
    (inference needs none of them)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import nnunetv2.paths  # noqa: F401


def to_harness_axes(values: Sequence[Any], transpose_forward: Sequence[int]) -> list[Any]:
    """Per-axis values in nnU-Net's preprocessed order as the harness's [X, Y, Z] order."""
    out: list[Any] = [None] * 3
    for i, axis in enumerate(transpose_forward):
        out[2 - axis] = values[i]
    return out


def to_nnunet_axes(values: Sequence[Any], transpose_forward: Sequence[int]) -> list[Any]:
    """Per-axis values in the harness's [X, Y, Z] order as nnU-Net's preprocessed order."""
    return [values[2 - axis] for axis in transpose_forward]


class FoldNetworks(torch.nn.Module):
    """nnU-Net's network slot: the folds' networks, one active at a time.

    nnU-Net switches folds with ``network.load_state_dict(parameters)``; here the
    "parameters" are ``{"fold": i}`` markers, so no weights are copied per case. Each forward
    pass is counted; with a `store`, a patch this fold already ran on the same input bytes is
    served from it (a clone: nnU-Net adds into what it gets).
    """

    def __init__(self, networks: Sequence[torch.nn.Module], checksums: Sequence[str]) -> None:
        super().__init__()
        self.folds = torch.nn.ModuleList(networks)
        self.checksums = tuple(checksums)
        self.active = 0
        self.store: OutputStore | None = None
        self.counts = ForwardCounts()

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:
        self.active = int(state["fold"])
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        network = self.folds[self.active]
        if self.store is None:
            self.counts.executed += 1
            return network(x)
        data = x.detach().cpu().contiguous().numpy()
        digest = hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()
        key = ("nnunet", self.checksums[self.active], tuple(x.shape), str(x.dtype), digest)
        kept = self.store.get(key)
        if kept is not None:
            self.counts.reused += 1
            self.counts.reused_forward_s += kept.forward_s
            return kept.batches[0].to(x.device).clone()
        started = time.perf_counter()
        output = network(x)
        self.counts.executed += 1
        elapsed = time.perf_counter() - started
        cpu = output.detach().to("cpu", copy=True)
        if cpu.element_size() * cpu.nelement() <= self.store.capacity_bytes:
            self.store.put(key, PatchOutputs(int(cpu.shape[1]), (cpu,), elapsed))
        return output


@dataclass(frozen=True)
class NnunetSettings:
    """nnU-Net's inference options, in the harness's names."""

    step_size: float  # tile step as a fraction of the patch: 1 - patch.overlap
    mirroring: bool  # inference.tta
    use_gaussian: bool  # inference.aggregation gaussian (else average)
    keep_largest_component: bool  # per foreground label, as nnU-Net's post-processing


@dataclass
class NnunetInputs(CaseInputs):
    """A case preprocessed by nnU-Net: `prepared.tensor` is its ``[C, z', y', x']`` data,
    `properties` what nnU-Net's export needs to go back to the native grid."""

    properties: dict = field(default_factory=dict)


class NnunetRunner:
    """The plans, labels and fold networks of one nnU-Net model; `patch_size` and `spacing`
    (nnU-Net's axis order) override the configuration's when set."""

    def __init__(
        self,
        model: NnunetModel,
        networks: Sequence[torch.nn.Module],
        patch_size: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
    ) -> None:
        quiet_import()
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        plans = dict(model.plans)
        configurations = dict(plans["configurations"])
        configuration = dict(configurations[model.configuration])
        if patch_size is not None:
            configuration["patch_size"] = [int(v) for v in patch_size]
        if spacing is not None:
            configuration["spacing"] = [float(v) for v in spacing]
        configurations[model.configuration] = configuration
        plans["configurations"] = configurations
        self.model = model
        self.plans_manager = PlansManager(plans)
        self.configuration = self.plans_manager.get_configuration(model.configuration)
        self.label_manager = self.plans_manager.get_label_manager(model.dataset_json)
        reader = str(plans.get("image_reader_writer", ""))
        if reader not in READERS:
            raise ConfigError(
                f"{model.folder}/plans.json: image_reader_writer '{reader}' reorients or is "
                f"not volumetric; expected one of {', '.join(READERS)}"
            )
        self.network = FoldNetworks(networks, [f.sha256 for f in model.folds])
        self.n_channels = len(model.dataset_json.get("channel_names", {}))

    def load_inputs(self, case: Case) -> NnunetInputs:
        """Read the case's channel files with nnU-Net's reader and preprocess them with its
        preprocessor; read the reference label on the native grid."""
        files = case.channels or (case.image,)
        for path in files:
            if not path.is_file():
                raise CaseError(f"{path}: image file not found")
        reader = self.plans_manager.image_reader_writer_class()
        try:
            data, properties = reader.read_images([str(p) for p in files])
        except (RuntimeError, OSError, ValueError) as error:
            raise CaseError(f"{files[0]}: unreadable image ({str(error)[:200]})") from None
        if data.shape[0] != self.n_channels:
            raise CaseError(
                f"{files[0]}: the image has {data.shape[0]} channel(s); dataset.json "
                f"channel_names lists {self.n_channels}"
            )
        header = nib.load(str(files[0]))
        native = native_grid(header.affine, header.shape[:3])
        if tuple(data.shape[1:][::-1]) != native.shape_vox:
            raise CaseError(f"{files[0]}: expected a 3-D volume per channel file")
        preprocessor = self.configuration.preprocessor_class(verbose=False)
        data, _, properties = preprocessor.run_case_npy(
            data, None, properties, self.plans_manager, self.configuration, self.model.dataset_json
        )
        contiguous = torch.contiguous_format
        tensor = torch.from_numpy(data).to(dtype=torch.float32, memory_format=contiguous)
        prepared = PreparedImage(tensor=tensor, affine=native.affine, native=native)
        inputs = NnunetInputs(case, prepared, None, None, properties)
        if case.label is not None:
            if not case.label.is_file():
                raise CaseError(f"{case.label}: label file not found")
            inputs.gt_labels, inputs.gt_affine = load_label(case.label)
            check_same_grid(case, prepared, inputs.gt_labels.shape, inputs.gt_affine)
        return inputs

    def logits(
        self,
        data: torch.Tensor,
        settings: NnunetSettings,
        device: torch.device,
        outputs: OutputStore | None = None,
        counts: ForwardCounts | None = None,
    ) -> torch.Tensor:
        """nnU-Net's logits ``[K, z', y', x']`` on the preprocessed grid (mean over mirrors
        and folds), from ``nnUNetPredictor`` with the folds in `FoldNetworks`."""
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        with contextlib.redirect_stdout(io.StringIO()):  # its note on CPU devices
            predictor = nnUNetPredictor(
                tile_step_size=settings.step_size,
                use_gaussian=settings.use_gaussian,
                use_mirroring=settings.mirroring,
                perform_everything_on_device=device.type == "cuda",
                device=device,
                verbose=False,
                verbose_preprocessing=False,
                allow_tqdm=False,
            )
        predictor.manual_initialization(
            self.network,
            self.plans_manager,
            self.configuration,
            [{"fold": i} for i in range(len(self.network.folds))],
            self.model.dataset_json,
            self.model.trainer,
            self.model.mirror_axes,
        )
        self.network.store, self.network.counts = outputs, counts or ForwardCounts()
        try:
            return predictor.predict_logits_from_preprocessed_data(data)
        finally:
            self.network.store = None

    def predict(
        self,
        inputs: NnunetInputs,
        settings: NnunetSettings,
        device: torch.device,
        keep_probabilities: bool = False,
        outputs: OutputStore | None = None,
        counts: ForwardCounts | None = None,
    ) -> CasePrediction:
        """Native-grid labels [X, Y, Z] (and probabilities [K, X, Y, Z] when asked) of a case,
        through nnU-Net's export; keep-largest per foreground label as its post-processing."""
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape as export,
        )

        t0 = time.perf_counter()
        logits = self.logits(inputs.prepared.tensor, settings, device, outputs, counts)
        t1 = time.perf_counter()
        result = export(
            logits.cpu(),
            self.plans_manager,
            self.configuration,
            self.label_manager,
            inputs.properties,
            return_probabilities=keep_probabilities,
        )
        segmentation, probabilities = result if keep_probabilities else (result, None)
        if settings.keep_largest_component:
            segmentation = self.keep_largest(segmentation)
        labels = np.ascontiguousarray(segmentation.transpose(2, 1, 0))
        if probabilities is not None:
            probabilities = np.ascontiguousarray(
                probabilities.transpose(0, 3, 2, 1), dtype=np.float32
            )
        return CasePrediction(
            labels=labels,
            n_channels=int(logits.shape[0]),
            timings_s={"inference_s": t1 - t0, "restore_s": time.perf_counter() - t1},
            probabilities=probabilities,
        )

    def keep_largest(self, segmentation: np.ndarray) -> np.ndarray:
        """nnU-Net's ``remove_all_but_largest_component`` for each foreground label."""
        from nnunetv2.postprocessing.remove_connected_components import (
            remove_all_but_largest_component_from_segmentation as keep,
        )

        for label in self.label_manager.foreground_labels:
            segmentation = keep(segmentation, [label])
        return segmentation

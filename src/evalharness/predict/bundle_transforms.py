"""A MONAI bundle's own preprocessing and restoration, applied by MONAI itself, per case.

`prepare_bundle_image` instantiates the bundle's checked ``preprocessing``
(`model.bundle_contract.BundlePipeline`) with a parser that holds nothing else, runs it on
``{image_key: path}`` and pads the result to the patch size as MONAI's sliding-window inferer
pads (zeros, the odd voxel after). The effective settings act on it: with
``preprocessing.apply_reorder`` off the ``Orientationd`` goes (on, one is added), another
``preprocessing.target_spacing`` becomes ``Spacingd``'s ``pixdim`` (null drops it), another
``preprocessing.normalization`` replaces the bundle's intensity transforms by the MONAI
transforms it names. The returned image's `inverse` takes the blended class probabilities back:
the padding cut off, then MONAI's ``Invertd`` replays the inverse of the spatial transforms the
image recorded (``Spacingd``, ``Orientationd``, ...) on them, as the bundle's post-processing
does; decoding (argmax) comes after, in the harness.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from evalharness.config.settings import EffectiveSettings, stable_hash
from evalharness.data.cases import Case
from evalharness.errors import CaseError, ConfigError, SourceError, first_line
from evalharness.model.bundle_contract import (
    BundlePipeline,
    is_intensity,
    normalization_spec,
    transform_name,
)
from evalharness.model.bundle_safety import allowed_class, instantiate
from evalharness.predict.patch_outputs import ForwardCounts, OutputStore
from evalharness.predict.pipeline import (
    CaseInputs,
    CasePrediction,
    forward_key,
    load_case_inputs,
    predict,
)
from evalharness.predict.preprocess import PreparedImage, PreprocessSettings, native_grid

NORMALIZATION_KEY = "preprocessing.normalization"
_LOADERS = ("LoadImaged", "EnsureChannelFirstd")


def _position_after(transforms: Sequence[Mapping], names: Sequence[str]) -> int:
    found = [i for i, t in enumerate(transforms) if transform_name(t) in names]
    return found[-1] + 1 if found else len(transforms)


def _normalization(specs: Sequence[Mapping], key: str) -> list[dict]:
    out = []
    for spec in specs:
        args = {k: v for k, v in spec.items() if k not in ("name", "channel_wise")}
        name = str(spec.get("name"))
        if allowed_class(name) is None:
            raise ConfigError(
                f"{NORMALIZATION_KEY}: {name!r} is not a MONAI transform; a bundle is normalised "
                "by MONAI intensity transforms (e.g. ScaleIntensityRanged, NormalizeIntensityd)"
            )
        out.append({"_target_": name, "keys": key, **args})
    return out


def effective_transforms(pipeline: BundlePipeline, settings: PreprocessSettings) -> list[dict]:
    """The bundle's transform configs with the effective settings acting on them (module doc)."""
    key = pipeline.image_key
    transforms = [copy.deepcopy(t) for t in pipeline.preprocessing]
    names = [transform_name(t) for t in transforms]
    if not settings.apply_reorder:
        transforms = [t for t in transforms if transform_name(t) != "Orientationd"]
    elif "Orientationd" not in names:
        orientation = {"_target_": "Orientationd", "keys": key, "axcodes": "RAS"}
        transforms.insert(_position_after(transforms, _LOADERS), orientation)
    spacing = settings.target_spacing_mm
    if spacing is None:
        transforms = [t for t in transforms if transform_name(t) != "Spacingd"]
    elif "Spacingd" in names:
        for t in transforms:
            if transform_name(t) == "Spacingd":
                t["pixdim"] = list(spacing)
    else:
        spacingd = {
            "_target_": "Spacingd",
            "keys": key,
            "pixdim": list(spacing),
            "mode": "bilinear",
        }
        transforms.insert(_position_after(transforms, (*_LOADERS, "Orientationd")), spacingd)
    own = [normalization_spec(t) for t in transforms if is_intensity(t)]
    wanted = [dict(s) for s in settings.normalization]
    if [_comparable(s) for s in own] != [_comparable(s) for s in wanted]:
        at = next((i for i, t in enumerate(transforms) if is_intensity(t)), None)
        transforms = [t for t in transforms if not is_intensity(t)]
        at = (
            _position_after(transforms, (*_LOADERS, "Orientationd", "Spacingd"))
            if at is None
            else at
        )
        transforms[at:at] = _normalization(wanted, key)
    return transforms


def _comparable(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in sorted(spec.items()) if k != "channel_wise"}


def _pad(
    image: torch.Tensor, min_shape: Sequence[int] | None, value: Any
) -> tuple[torch.Tensor, list[int]]:
    """[C, X, Y, Z] padded to at least `min_shape` as MONAI's sliding window pads (the odd voxel
    after); the voxels added before each axis."""
    shape = list(image.shape[1:])
    before, widths = [], []
    for size, wanted in zip(shape, min_shape or shape, strict=True):
        diff = max(int(wanted) - size, 0)
        before.append(diff // 2)
        widths = [diff // 2, diff - diff // 2, *widths]  # torch pads the last axis first
    if not any(widths):
        return image, before
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"preprocessing.padding_mode={value!r}: a bundle pads with a number")
    return torch.nn.functional.pad(image, widths, value=float(value)), before


def _inverse(compose: Any, pipeline: BundlePipeline, image: MetaTensor, before: list[int]):
    """Probabilities [K, X'+pad, ...] -> [K, X, Y, Z] float32 on the native grid (Invertd)."""
    reference = MetaTensor(
        torch.zeros(1), meta=image.meta, applied_operations=image.applied_operations
    )
    crop = tuple(slice(b, b + s) for b, s in zip(before, image.shape[1:], strict=True))
    invert = Invertd(
        keys="pred",
        transform=compose,
        orig_keys=pipeline.image_key,
        nearest_interp=pipeline.nearest_interp,
        to_tensor=True,
    )

    def inverse(probs: torch.Tensor) -> torch.Tensor:
        pred = MetaTensor(probs[(slice(None), *crop)])
        restored = invert({"pred": pred, pipeline.image_key: reference})["pred"]
        return restored.as_tensor().float()

    return inverse


def prepare_bundle_image(
    path: Path, settings: PreprocessSettings, pipeline: BundlePipeline
) -> PreparedImage:
    """Read and preprocess `path` with the bundle's `pipeline` under `settings` (module doc)."""
    transforms = effective_transforms(pipeline, settings)
    try:
        compose = instantiate({"_target_": "Compose", "transforms": transforms}, "preprocessing")
    except SourceError as error:
        raise ConfigError(str(error)) from None
    try:
        image = compose({pipeline.image_key: str(path)})[pipeline.image_key]
    except Exception as error:  # MONAI's reader or a transform failed on this file
        raise CaseError(
            f"{path}: the bundle's preprocessing failed ({first_line(error)})"
        ) from None
    if not isinstance(image, MetaTensor):
        raise CaseError(f"{path}: the bundle's preprocessing returned no image with metadata")
    affine = np.asarray(image.meta.get("original_affine"), dtype=np.float64)
    native = native_grid(affine, [int(s) for s in image.meta["spatial_shape"]])
    tensor, before = _pad(image.as_tensor().float(), settings.min_shape_vox, settings.padding_mode)
    model_affine = np.asarray(image.affine, dtype=np.float64).copy()
    model_affine[:3, 3] -= model_affine[:3, :3] @ np.asarray(before, dtype=np.float64)
    inverse = _inverse(compose, pipeline, image, before) if pipeline.invert else None
    return PreparedImage(tensor.contiguous(), model_affine, native, inverse=inverse)


@dataclass
class BundleFamily:
    """`predict.family.ModelFamily` for a MONAI bundle: its preprocessing by MONAI
    (`prepare_bundle_image`), then the harness's own `predict` (sliding window blending the
    bundle network's logits, the bundle's Invertd, argmax, keep-largest)."""

    contents: Any  # model.bundle_source.ResolvedBundle
    network: torch.nn.Module  # the loaded `BundleNetwork`, on `device`
    settings: EffectiveSettings
    device: torch.device
    n_output_channels: int
    max_device_memory_mb: float | None = None
    name: str = "bundle"
    combine_rule: str = "logits"  # patches (and mirror flips) blend logits, then the activation

    def load_inputs(self, case: Case, settings: PreprocessSettings) -> CaseInputs:
        prepare = functools.partial(prepare_bundle_image, pipeline=self.contents.contract.pipeline)
        return load_case_inputs(case, settings, prepare)

    def inputs_key(self) -> str:
        return stable_hash(
            {"bundle": self.contents.bundle.sha256, "trusted": self.contents.bundle.trusted}
        )

    def forward_key(self, model_key: str) -> str:
        return stable_hash(
            {"family": self.name, "forward": forward_key(model_key, self.settings, self.device)}
        )

    def predict(
        self,
        inputs: CaseInputs,
        keep_probabilities: bool,
        outputs: OutputStore | None,
        counts: ForwardCounts | None,
    ) -> CasePrediction:
        return predict(
            self.network,
            inputs.prepared,
            self.settings,
            self.device,
            self.n_output_channels,
            self.max_device_memory_mb,
            keep_probabilities=keep_probabilities,
            outputs=outputs,
            counts=counts,
        )

    def tags(self) -> dict[str, str]:
        """The bundle's name, version, trust and the sha256 of every file used."""
        bundle = self.contents.bundle
        return {
            "evalharness.bundle_name": bundle.name,
            "evalharness.bundle_version": bundle.version,
            "evalharness.trust_bundle": str(bundle.trusted).lower(),
            "evalharness.bundle_files": ", ".join(f"{p}={sha}" for p, sha in bundle.files),
            "evalharness.combine_rule": (
                "logits blended over patches and mirrors, then the bundle's activation "
                "(MONAI's inferer)"
            ),
        }

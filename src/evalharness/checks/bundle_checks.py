"""Checks of a MONAI bundle against the evaluation: the transforms of its config the evaluation
cannot apply (error-class mismatch entries naming them), the inferer's batch size, and its
metadata's ``network_data_format`` against the dataset's labels, the images' channels and the
network (a `ConfigError` before inference). The bundle's settings themselves (spacing,
orientation, intensity transforms, patch size, overlap, mode) are a training configuration,
compared by `config_checks` like a fastMONAI run's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib

from evalharness.checks.mismatches import Mismatch
from evalharness.config.settings import EffectiveSettings
from evalharness.errors import ConfigError
from evalharness.model.bundle import METADATA, Bundle
from evalharness.model.bundle_contract import BundleContract

NOT_APPLICABLE_KEY = "bundle.transforms"


def bundle_findings(contract: BundleContract, settings: EffectiveSettings) -> list[Mismatch]:
    """An error per transform of the bundle the evaluation cannot apply; an info entry when the
    evaluation's batch size is not the inferer's ``sw_batch_size``."""
    out = [
        Mismatch(
            "config",
            NOT_APPLICABLE_KEY,
            where,
            None,
            "error",
            f"the bundle's {where}: {what}; the evaluation cannot apply it, so its predictions "
            "may differ from the bundle's own",
        )
        for where, what in contract.not_applicable
    ]
    batch = contract.batch_size
    if batch is not None and batch != settings.batch_size:
        out.append(
            Mismatch(
                "config",
                "inference.batch_size",
                batch,
                settings.batch_size,
                "info",
                f"batch size differs: the bundle's inferer {batch} vs evaluation "
                f"{settings.batch_size} (speed and memory only)",
            )
        )
    return out


def _plain(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", str(name)).lower()


def _first_spec(section: object) -> Mapping:
    if isinstance(section, Mapping):
        for spec in section.values():
            if isinstance(spec, Mapping):
                return spec
    return {}


def image_channels(path: Path) -> int | None:
    """Channels of an image file from its header (4-D: the last axis), None if unreadable."""
    try:
        shape = nib.load(str(path)).shape
    except Exception:  # the per-case loading reports unreadable files
        return None
    return int(shape[3]) if len(shape) > 3 else 1


def check_bundle_data(
    bundle: Bundle,
    label_names: Mapping[int, str],
    first_image: Path | None,
    n_input_channels: int,
    n_output_channels: int,
) -> None:
    """The metadata's ``network_data_format`` (inputs: ``num_channels``; outputs:
    ``num_channels`` and ``channel_def``) against the network, the first image's channels and
    the dataset's labels; `ConfigError` naming metadata.json and the disagreement."""
    data_format = bundle.data_format or {}
    where = bundle.root / METADATA
    inputs, outputs = (
        _first_spec(data_format.get("inputs")),
        _first_spec(data_format.get("outputs")),
    )
    n_in = inputs.get("num_channels")
    channels = image_channels(first_image) if first_image is not None else None
    if isinstance(n_in, int) and channels is not None and channels != n_in:
        raise ConfigError(
            f"{where}: network_data_format inputs num_channels is {n_in} but {first_image} has "
            f"{channels} channel(s); expected images the bundle was made for"
        )
    n_out = outputs.get("num_channels")
    if isinstance(n_out, int) and n_out != n_output_channels:
        raise ConfigError(
            f"{where}: network_data_format outputs num_channels is {n_out} but the network gives "
            f"{n_output_channels}"
        )
    channel_def = outputs.get("channel_def")
    if not isinstance(channel_def, Mapping) or not label_names:
        return
    try:
        classes = {int(k): str(v) for k, v in channel_def.items()}
    except ValueError:
        raise ConfigError(
            f"{where}: network_data_format outputs channel_def keys must be channel numbers"
        ) from None
    if n_output_channels == 1:
        classes = {1: classes[min(classes)]} if classes else {}
    dataset = {int(k): str(v) for k, v in label_names.items()}
    if n_output_channels > 1 and sorted(classes) != sorted(dataset):
        raise ConfigError(
            f"{where}: network_data_format outputs channel_def {channel_def} has labels "
            f"{sorted(classes)} but the dataset has {sorted(dataset)} ({dataset})"
        )
    for label, name in sorted(classes.items()):
        if label in dataset and _plain(dataset[label]) != _plain(name):
            raise ConfigError(
                f"{where}: network_data_format outputs channel {label} is {name!r} but the "
                f"dataset's label {label} is {dataset[label]!r}"
            )

"""Tiny real MONAI bundles for the tests, built with MONAI's own config format.

The network is ``torch.nn.Conv3d(1, 2, 1)`` whose class-1 logit minus class-0 logit is
``10 x - 5``: after the bundle's preprocessing (RAS, 1.5 x 1 x 2 mm, intensities clipped to
[0, 1]) a voxel is class 1 exactly where the image is >= 0.5, so an image equal to its label
map is segmented perfectly. The config has the spleen bundle's shape (LoadImaged ...
Invertd, AsDiscreted, SaveImaged) and, like every published bundle, ``$`` expressions in ids
the evaluation does not need; `UNNEEDED_MARKER` ids would write a file if they were evaluated.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from evalharness.model.bundle import METADATA

NETWORK_DEF = {
    "_target_": "torch.nn.Conv3d",
    "in_channels": 1,
    "out_channels": 2,
    "kernel_size": 1,
}
PREPROCESSING = {
    "_target_": "Compose",
    "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key"},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
        {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
        {
            "_target_": "Spacingd",
            "keys": "@image_key",
            "pixdim": [1.5, 1.0, 2.0],
            "mode": "bilinear",
        },
        {
            "_target_": "ScaleIntensityRanged",
            "keys": "@image_key",
            "a_min": 0,
            "a_max": 1,
            "b_min": 0,
            "b_max": 1,
            "clip": True,
        },
        {"_target_": "EnsureTyped", "keys": "@image_key"},
    ],
}
INFERER = {
    "_target_": "SlidingWindowInferer",
    "roi_size": [8, 8, 8],
    "sw_batch_size": 4,
    "overlap": 0.5,
}
POSTPROCESSING = {
    "_target_": "Compose",
    "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {
            "_target_": "Invertd",
            "keys": "pred",
            "transform": "@preprocessing",
            "orig_keys": "@image_key",
            "nearest_interp": False,
            "to_tensor": True,
        },
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {
            "_target_": "SaveImaged",
            "keys": "pred",
            "output_dir": "@output_dir",
            "output_dtype": "$numpy.float32",
        },
    ],
}
METADATA_CONTENT = {
    "version": "0.1.0",
    "name": "Tiny threshold bundle",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "num_channels": 1, "channel_def": {"0": "image"}}},
        "outputs": {
            "pred": {
                "type": "image",
                "format": "segmentation",
                "num_channels": 2,
                "channel_def": {"0": "background", "1": "target"},
            }
        },
    },
}


def inference_config(marker: Path | None = None) -> dict[str, Any]:
    """The tiny bundle's inference.json; `marker`: unneeded ids that would write it if run."""
    write = f"open('{marker}', 'w').write('ran')" if marker else "0"
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "image_key": "image",
        "output_dir": f"$@bundle_root + '/eval' if {write} else ''",
        "dataset_dir": "/nowhere",
        "datalist": f"$[{write}] + sorted(glob.glob(@dataset_dir + '/*.nii.gz'))",
        "device": "$torch.device('cpu')",
        "network_def": copy.deepcopy(NETWORK_DEF),
        "network": "$@network_def.to(@device)",
        "preprocessing": copy.deepcopy(PREPROCESSING),
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': i} for i in @datalist]",
            "transform": "@preprocessing",
        },
        "inferer": copy.deepcopy(INFERER),
        "postprocessing": copy.deepcopy(POSTPROCESSING),
        "run": [f"${write}"],
    }


def threshold_state() -> dict[str, torch.Tensor]:
    """Weights of `NETWORK_DEF`: logit1 - logit0 = 10 x - 5."""
    network = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        network.weight.zero_()
        network.bias.zero_()
        network.weight[1].fill_(10.0)
        network.bias[1] = -5.0
    return network.state_dict()


def write_bundle(
    root: Path,
    config: dict[str, Any] | None = None,
    *,
    state: dict[str, torch.Tensor] | None = None,
    torchscript: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """A bundle folder: configs/inference.json, configs/metadata.json and models/model.pt (or
    models/model.ts, the TorchScript of the same network, instead)."""
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "configs" / "inference.json").write_text(json.dumps(config or inference_config()))
    (root / METADATA).write_text(json.dumps(metadata or METADATA_CONTENT))
    weights = threshold_state() if state is None else state
    if torchscript:
        network = torch.nn.Conv3d(1, 2, 1)
        network.load_state_dict(weights)
        torch.jit.script(network.eval()).save(str(root / "models" / "model.ts"))
    else:
        torch.save(weights, root / "models" / "model.pt")
    return root

"""Write tiny fastMONAI 0.12 exports of every segmentation architecture it registers.

Run ONCE, with a real fastMONAI 0.12 in its own virtualenv (fastMONAI is not a dependency of
the harness):

    python -m venv /tmp/fm && /tmp/fm/bin/pip install torch==2.13.0 "fastMONAI==0.12.*"
    /tmp/fm/bin/python tests/data/fastmonai-0.12-architectures/make_fixtures.py

Per case folder: `best_model.safetensors` written by fastMONAI's own `save_safetensors_model`
(what its MLflow callback calls) from `make_model_spec` + `build_model_from_spec`, and
`reference.safetensors` holding a fixed `input` [1, 1, 16, 16, 16] and the `output` of the
network fastMONAI's own `load_safetensors_model` rebuilds from that file, in eval mode. The
DynUNet case from issue 17 also gets `best_weights.pth` (fastai `learn.save(with_opt=False)`,
as the callback writes it) and `best_weights_with_opt.pth` (`learn.save(with_opt=True)`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import fastai
import fastMONAI
import monai
import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastMONAI.utils import (
    build_model_from_spec,
    load_safetensors_model,
    make_model_spec,
    make_output_spec,
    patch_inference_config,
    save_safetensors_model,
)
from fastMONAI.vision_augmentation import ZNormalization
from fastMONAI.vision_patch import PatchConfig
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
ADAPTER = [{"wrapper_id": "fastmonai.dynunet_ds_adapter", "wrapper_kwargs": {}}]
DYNUNET = dict(
    spatial_dims=3,
    in_channels=1,
    kernel_size=[3, 3, 3, 3],
    strides=[1, 2, 2, 2],
    upsample_kernel_size=[2, 2, 2],
)
UNET = dict(spatial_dims=3, in_channels=1, channels=[4, 8, 16], strides=[2, 2])
# name: (arch_id, arch_kwargs, wrapper_spec, classes or None for binary)
CASES = {
    # issue 17's DynUNet, filters quartered-ish to keep the file small
    "dynunet_res_block": (
        "monai.dynunet",
        dict(DYNUNET, out_channels=3, filters=[4, 8, 16, 32], res_block=True),
        [],
        [0, 1, 2],
    ),
    "dynunet": (
        "monai.dynunet",
        dict(DYNUNET, out_channels=3, filters=[2, 4, 8, 16]),
        [],
        [0, 1, 2],
    ),
    "dynunet_deep_supervision": (
        "monai.dynunet",
        dict(
            DYNUNET, out_channels=2, filters=[2, 4, 8, 16], deep_supervision=True, deep_supr_num=2
        ),
        [],
        [0, 1],
    ),
    "dynunet_ds_adapter": (
        "monai.dynunet",
        dict(
            DYNUNET,
            out_channels=2,
            filters=[2, 4, 8, 16],
            res_block=True,
            deep_supervision=True,
            deep_supr_num=2,
        ),
        ADAPTER,
        [0, 1],
    ),
    "unet": (
        "monai.unet",
        dict(
            UNET,
            out_channels=2,
            num_res_units=1,
            act=["prelu", {"init": 0.2}],
            norm=["instance", {"affine": True}],
            dropout=0.1,
        ),
        [],
        [0, 1],
    ),
    "unet_inner": ("monai.unet_inner", dict(UNET, out_channels=1, num_res_units=2), [], None),
}
PATCH = PatchConfig(
    patch_size=[16, 16, 16],
    patch_overlap=0.5,
    aggregation_mode="hann",
    apply_reorder=True,
    target_spacing=[1.5, 1.0, 2.0],
    normalization=[ZNormalization()],
)


def _output_spec(classes):
    if classes is None:
        return make_output_spec("binary_segmentation", threshold=0.5)
    return make_output_spec("multiclass_segmentation", classes=classes)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter and buffer (zero biases would hide wrong loads)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)


def _learn_save(model: torch.nn.Module, folder: Path) -> None:
    """fastai's own `Learner.save`, with and without the optimizer state."""
    data = [(torch.zeros(1, 16, 16, 16), torch.zeros(1, 16, 16, 16))]
    dls = DataLoaders(DataLoader(data, bs=1), DataLoader(data, bs=1))
    learn = Learner(dls, model, loss_func=torch.nn.functional.mse_loss, path=folder, model_dir=".")
    learn.save("best_weights", with_opt=False)
    learn.create_opt()
    learn.save("best_weights_with_opt", with_opt=True)


def main() -> None:
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(17))
    for seed, (name, (arch_id, kwargs, wrappers, classes)) in enumerate(CASES.items()):
        folder = HERE / name
        folder.mkdir(exist_ok=True)
        spec = make_model_spec(arch_id, kwargs, wrappers)
        model = build_model_from_spec(spec)
        _perturb(model, seed)
        model.eval()
        path = save_safetensors_model(
            model,
            folder / "best_model.safetensors",
            spec,
            patch_inference_config(PATCH, _output_spec(classes)),
            "best",
            mlflow_run="fixture",
        )
        loaded = load_safetensors_model(path)  # fastMONAI's own loader, eval mode
        with torch.no_grad():
            output = loaded(x)
        assert not isinstance(output, (list, tuple)), name
        reference = {"input": x, "output": output.contiguous()}
        save_file(reference, str(folder / "reference.safetensors"))
        if name == "dynunet_res_block":
            _learn_save(model, folder)
        print(name, tuple(output.shape), f"{path.stat().st_size / 1e3:.0f} kB")
    versions = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "fastMONAI": fastMONAI.__version__,
        "fastai": fastai.__version__,
        "monai": monai.__version__,
    }
    (HERE / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    print(versions)


if __name__ == "__main__":
    main()

"""Every segmentation architecture fastMONAI 0.12 exports loads as fastMONAI loads it.

The files under tests/fixtures/fastmonai-0.12-architectures/ were written by a real fastMONAI 0.12
(see its README): each loads here and gives outputs equal to the network fastMONAI itself
rebuilt (its `reference.safetensors`, to a float32 tolerance: it was computed by another torch
build) and equal to the same MONAI network built and loaded by hand here. A weight off by a
realistic amount fails that tolerance; tampered files fail with one line naming the file and the
reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from monai.networks.nets import DynUNet, UNet
from safetensors.torch import load_file, load_model, save_file
from tiny import SHAPE, ball, compose_config, run_in_process, write_dataset

from evalharness.errors import SourceError
from evalharness.model.architectures import DynUNetDSAdapter, normalize_monai_kwargs
from evalharness.model.loaders import load_model_file, load_state_dict_with_metadata
from evalharness.model.training_config import read_safetensors_metadata

EXPORTS = REPO / "tests" / "fixtures" / "fastmonai-0.12-architectures"
# `reference.safetensors` was computed by torch 2.14.1 on another machine; another build's
# convolution kernels round float32 differently: up to 1.4e-06 here (unet_inner, |output| <= 6.9;
# torch 2.13.0, AVX512 EPYC), about 3 float32 ulps at that magnitude. 1e-5 is about 20 ulps
# (float32 eps 1.19e-7 x |output| 7 x a dozen layers) and still 16x below the smallest realistic
# loading defect measured on these exports (test_a_realistic_weight_defect_is_caught).
ATOL_ACROSS_BUILDS = 1e-5
# the tensor that maps features to classes (scaling it is not normalised away further on)
HEAD = {
    "dynunet_res_block": "output_block.conv.conv",
    "dynunet": "output_block.conv.conv",
    "dynunet_deep_supervision": "output_block.conv.conv",
    "dynunet_ds_adapter": "model.output_block.conv.conv",
    "unet": "model.2.1.conv.unit0.conv",
    "unet_inner": "2.1.conv.unit0.conv",
}
ISSUE_DYNUNET = EXPORTS / "dynunet_res_block"
_DYNUNET = dict(
    spatial_dims=3,
    in_channels=1,
    kernel_size=(3, 3, 3, 3),
    strides=(1, 2, 2, 2),
    upsample_kernel_size=(2, 2, 2),
)
_UNET = dict(spatial_dims=3, in_channels=1, channels=(4, 8, 16), strides=(2, 2))
# folder -> the same network written out with MONAI directly (see the fixture README)
BY_HAND: dict[str, Callable[[], torch.nn.Module]] = {
    "dynunet_res_block": lambda: DynUNet(
        **_DYNUNET, out_channels=3, filters=(4, 8, 16, 32), res_block=True
    ),
    "dynunet": lambda: DynUNet(**_DYNUNET, out_channels=3, filters=(2, 4, 8, 16)),
    "dynunet_deep_supervision": lambda: DynUNet(
        **_DYNUNET, out_channels=2, filters=(2, 4, 8, 16), deep_supervision=True, deep_supr_num=2
    ),
    "dynunet_ds_adapter": lambda: DynUNet(
        **_DYNUNET,
        out_channels=2,
        filters=(2, 4, 8, 16),
        res_block=True,
        deep_supervision=True,
        deep_supr_num=2,
    ),
    "unet": lambda: UNet(
        **_UNET,
        out_channels=2,
        num_res_units=1,
        act=("prelu", {"init": 0.2}),
        norm=("instance", {"affine": True}),
        dropout=0.1,
    ),
    "unet_inner": lambda: UNet(**_UNET, out_channels=1, num_res_units=2).model,
}


def _forward(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return network(x)


def _assert_matches_reference(output: torch.Tensor, reference: torch.Tensor) -> None:
    """`output` (this build) equals fastMONAI's stored output up to float32 rounding."""
    torch.testing.assert_close(output, reference, rtol=0, atol=ATOL_ACROSS_BUILDS)


def _reference(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, fastMONAI's own eval-mode output) stored next to the export."""
    tensors = load_file(str(folder / "reference.safetensors"))
    return tensors["input"], tensors["output"]


def _by_hand(folder: Path) -> torch.nn.Module:
    """The MONAI network, weights loaded with safetensors' own strict `load_model`."""
    network = BY_HAND[folder.name]()
    holder = network
    if folder.name == "dynunet_ds_adapter":  # the adapter's weights are named `model.*`
        holder = torch.nn.Module()
        holder.model = network
    load_model(holder, str(folder / "best_model.safetensors"), strict=True)
    return network.eval()


def _rewrite(
    source: Path,
    target: Path,
    drop: str | None = None,
    change: Callable[[dict[str, torch.Tensor]], None] | None = None,
    **metadata: str,
) -> Path:
    """A copy of a safetensors export with one tensor dropped, tensors changed in place by
    `change`, or metadata values replaced."""
    tensors = {k: v for k, v in load_file(str(source)).items() if k != drop}
    if change is not None:
        change(tensors)
    save_file(tensors, str(target), metadata={**read_safetensors_metadata(source), **metadata})
    return target


@pytest.mark.parametrize("name", sorted(BY_HAND))
def test_each_real_export_loads_and_matches_fastmonai_and_monai_by_hand(name: str) -> None:
    folder = EXPORTS / name
    loaded = load_model_file(folder / "best_model.safetensors")
    metadata = read_safetensors_metadata(folder / "best_model.safetensors")
    assert loaded.loader == "safetensors" and not loaded.network.training
    assert loaded.arch["arch_id"] == metadata["arch_id"]
    assert repr(loaded.network) == metadata["repr"]
    assert loaded.inference_config["patch_config"]["patch_size"] == [16, 16, 16]
    x, fastmonai_output = _reference(folder)
    output = _forward(loaded.network, x)
    _assert_matches_reference(output, fastmonai_output)
    assert torch.equal(output, _forward(_by_hand(folder), x))  # same build, same kernels


def _scale_head(tensors: dict[str, torch.Tensor], name: str) -> None:
    tensors[f"{HEAD[name]}.weight"] = tensors[f"{HEAD[name]}.weight"] * 1.01


def _nudge_head_bias(tensors: dict[str, torch.Tensor], name: str) -> None:
    bias = tensors[f"{HEAD[name]}.bias"].clone()
    bias[0] += 1e-3
    tensors[f"{HEAD[name]}.bias"] = bias


def _through_float16(tensors: dict[str, torch.Tensor], name: str) -> None:
    for key, value in tensors.items():
        tensors[key] = value.half().float()


DEFECTS = {
    "head weight x 1.01": _scale_head,
    "one head bias + 1e-3": _nudge_head_bias,
    "every weight rounded to float16": _through_float16,
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
@pytest.mark.parametrize("name", sorted(BY_HAND))
def test_a_realistic_weight_defect_is_caught(name: str, defect: str, tmp_path: Path) -> None:
    """A file whose weights are off by a realistic amount loads, but its output fails the
    tolerance against fastMONAI's by a wide margin (more than 10x)."""
    source = EXPORTS / name / "best_model.safetensors"
    changed = _rewrite(
        source, tmp_path / "best_model.safetensors", change=lambda t: DEFECTS[defect](t, name)
    )
    x, fastmonai_output = _reference(EXPORTS / name)
    output = _forward(load_model_file(changed).network, x)
    assert (output - fastmonai_output).abs().max() > 10 * ATOL_ACROSS_BUILDS
    with pytest.raises(AssertionError, match="Tensor-likes are not close"):
        _assert_matches_reference(output, fastmonai_output)


def test_the_deep_supervision_adapter_gives_only_the_main_output() -> None:
    folder = EXPORTS / "dynunet_ds_adapter"
    loaded = load_model_file(folder / "best_model.safetensors")
    assert isinstance(loaded.network, DynUNetDSAdapter)
    assert loaded.arch["wrapper_spec"] == [
        {"wrapper_id": "fastmonai.dynunet_ds_adapter", "wrapper_kwargs": {}}
    ]
    x, adapter_eval_output = _reference(folder)
    output = _forward(loaded.network, x)
    assert output.shape == (1, 2, 16, 16, 16)  # one head, not the stacked [1, 3, 2, ...]
    _assert_matches_reference(output, adapter_eval_output)
    inner = loaded.network.model
    inner.train()
    with torch.no_grad():
        assert inner(x).shape == (1, 3, 2, 16, 16, 16)  # what training saw: 1 + 2 heads


def test_issue_dynunet_shares_weights_that_the_file_stores_once() -> None:
    path = ISSUE_DYNUNET / "best_model.safetensors"
    loaded = load_model_file(path)
    network = loaded.network
    assert len(network.state_dict()) == 116 and len(load_file(str(path))) == 59
    alias = network.state_dict()["skip_layers.downsample.conv1.conv.weight"]
    assert alias.data_ptr() == network.state_dict()["input_block.conv1.conv.weight"].data_ptr()
    # a model.arch in place of the metadata restores the aliases too
    arch = {"_target_": "monai.networks.nets.DynUNet", **_DYNUNET, "out_channels": 3}
    arch.update(filters=[4, 8, 16, 32], res_block=True)
    x, fastmonai_output = _reference(ISSUE_DYNUNET)
    by_arch = _forward(load_model_file(path, arch=arch).network, x)
    _assert_matches_reference(by_arch, fastmonai_output)
    assert torch.equal(by_arch, _forward(network, x))  # same build, same kernels


@pytest.mark.parametrize("weights", ["best_weights.pth", "best_weights_with_opt.pth"])
def test_fastai_weights_load_with_the_safetensors_siblings_metadata(weights: str) -> None:
    metadata = read_safetensors_metadata(ISSUE_DYNUNET / "best_model.safetensors")
    loaded = load_state_dict_with_metadata(ISSUE_DYNUNET / weights, metadata)
    assert loaded.loader == "state_dict" and loaded.arch["arch_id"] == "monai.dynunet"
    assert loaded.inference_config["output"]["classes"] == [0, 1, 2]
    x, fastmonai_output = _reference(ISSUE_DYNUNET)
    output = _forward(loaded.network, x)
    _assert_matches_reference(output, fastmonai_output)
    # the same file with a model.arch instead of the metadata: the same network
    arch = {"_target_": "monai.networks.nets.DynUNet", **_DYNUNET, "out_channels": 3}
    arch.update(filters=[4, 8, 16, 32], res_block=True)
    by_arch = load_model_file(ISSUE_DYNUNET / weights, arch=arch)
    assert torch.equal(_forward(by_arch.network, x), output)  # same build, same kernels


def test_weights_of_another_architecture_fail_by_name() -> None:
    metadata = read_safetensors_metadata(EXPORTS / "dynunet" / "best_model.safetensors")
    path = ISSUE_DYNUNET / "best_weights.pth"
    with pytest.raises(SourceError) as error:
        load_state_dict_with_metadata(path, metadata)
    message = str(error.value)
    assert message.startswith(f"{path}: weights do not fit the DynUNet architecture")
    assert "\n" not in message


def test_a_removed_tensor_fails_with_one_line(tmp_path: Path) -> None:
    source = ISSUE_DYNUNET / "best_model.safetensors"
    tampered = _rewrite(
        source, tmp_path / "best_model.safetensors", drop="output_block.conv.conv.bias"
    )
    with pytest.raises(SourceError) as error:
        load_model_file(tampered)
    message = str(error.value)
    assert message.startswith(f"{tampered}: weights do not fit the DynUNet architecture")
    assert "missing ['output_block.conv.conv.bias']" in message and "\n" not in message
    # a shared tensor stored once and removed is missing under every one of its names
    shared = _rewrite(source, tmp_path / "shared.safetensors", drop="input_block.conv1.conv.weight")
    with pytest.raises(SourceError, match=r"missing \['input_block\.conv1\.conv\.weight', 'skip"):
        load_model_file(shared)


def test_a_repr_that_does_not_match_fails_with_one_line(tmp_path: Path) -> None:
    source = EXPORTS / "unet" / "best_model.safetensors"
    metadata = read_safetensors_metadata(source)
    wrong = _rewrite(
        source, tmp_path / "repr.safetensors", repr=metadata["repr"].replace("p=0.1", "p=0.5")
    )
    with pytest.raises(SourceError) as error:
        load_model_file(wrong)
    message = str(error.value)
    assert message.startswith(
        f"{wrong}: the monai.unet network rebuilt from arch_kwargs does not match the file's repr"
    )
    assert (
        "(line 9: rebuilt '(D): Dropout(p=0.1, inplace=False)', file '(D): Dropout(p=0.5" in message
        and "\n" not in message
    )
    # arch_kwargs that no longer describe the network: refused before any weight is loaded
    kwargs = json.loads(metadata["arch_kwargs"])
    other = _rewrite(
        source, tmp_path / "kwargs.safetensors", arch_kwargs=json.dumps({**kwargs, "dropout": 0.2})
    )
    with pytest.raises(SourceError, match=r"kwargs\.safetensors: the monai\.unet network .*p=0\.2"):
        load_model_file(other)


def test_unsupported_architectures_and_wrappers_fail_by_name(tmp_path: Path) -> None:
    source = EXPORTS / "dynunet" / "best_model.safetensors"
    segmamba = _rewrite(source, tmp_path / "segmamba.safetensors", arch_id="segmamba.v2")
    with pytest.raises(SourceError, match=r"segmamba\.v2' needs the SegMamba-V2 fork .*not on"):
        load_model_file(segmamba)
    classifier = _rewrite(source, tmp_path / "clf.safetensors", arch_id="monai.classifier")
    with pytest.raises(SourceError, match="is a MONAI Classifier, not a segmentation network"):
        load_model_file(classifier)
    wrapper = json.dumps([{"wrapper_id": "my.wrapper", "wrapper_kwargs": {}}])
    wrapped = _rewrite(source, tmp_path / "wrapped.safetensors", wrapper_spec=wrapper)
    with pytest.raises(
        SourceError, match=r"wrapped\.safetensors: wrapper_spec entry .*my\.wrapper"
    ):
        load_model_file(wrapped)


def test_kwargs_are_normalised_as_fastmonai_does() -> None:
    given = {
        "channels": [4, 8],
        "strides": [2],
        "kernel_size": [3, 3],
        "upsample_kernel_size": [2],
        "filters": [2, 4],
        "act": ["prelu", {"init": 0.2}],
        "norm": ["instance", {"affine": True}, "extra"],  # not a pair: left as it is
        "dropout": 0.1,
        "other": [1, 2],
    }
    assert normalize_monai_kwargs(given) == {
        "channels": (4, 8),
        "strides": (2,),
        "kernel_size": (3, 3),
        "upsample_kernel_size": (2,),
        "filters": (2, 4),
        "act": ("prelu", {"init": 0.2}),
        "norm": ["instance", {"affine": True}, "extra"],
        "dropout": 0.1,
        "other": [1, 2],
    }
    assert isinstance(normalize_monai_kwargs(given)["act"], tuple)


def test_the_issue_dynunet_evaluates_end_to_end(sqlite_uri: str, tmp_path: Path, capsys) -> None:
    """`model.path=<dynunet best_model.safetensors>`: the run finishes, both labels scored."""
    label = ball()
    label[: SHAPE[0] // 2][label[: SHAPE[0] // 2] == 1] = 2
    image = label.astype(np.float32)
    labels = {"0": "background", "1": "one", "2": "two"}
    root = write_dataset(tmp_path / "data", {"a": (image, label)}, labels)
    overrides = [
        f"mlflow.tracking_uri={sqlite_uri}",
        "mlflow.experiment=dynunet",
        "model=file",
        f"model.path={ISSUE_DYNUNET / 'best_model.safetensors'}",
        "data=decathlon",
        f"data.root={root}",
        "data.split.method=all",
        "inference.device=cpu",
        "output.plots=false",
    ]
    assert compose_config(*overrides).model.path.endswith("best_model.safetensors")
    result = run_in_process(sqlite_uri, tmp_path / "out", overrides, capsys)
    assert result.outcome.code == 0, result.error_lines
    assert result.run.info.status == "FINISHED"
    assert result.run.data.tags["evalharness.model_loader"] == "safetensors"
    table = result.table
    assert list(zip(table["case"], table["label"], strict=True)) == [("a", 1), ("a", 2)]
    assert set(table["status"]) == {"ok"} and table["dsc"].between(0, 1).all()

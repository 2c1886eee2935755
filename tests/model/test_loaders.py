"""Model loading: the real fastMONAI files (Learner export, safetensors, state dict) and
TorchScript give the same networks, and unsafe or unloadable files are refused by name."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE
from safetensors.torch import save_file

from evalharness.errors import SourceError
from evalharness.model.loaders import load_model_file

RUN = FIXTURE / "training_run"
LEARNER = RUN / "model" / "best_learner.pkl"
SAFETENSORS = RUN / "model" / "best_model.safetensors"
STATE_DICT = RUN / "model" / "best_weights_state_dict.pth"
UNET = {
    "_target_": "monai.networks.nets.UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 2,
    "channels": [8, 16, 32, 64],
    "strides": [2, 2, 2],
    "num_res_units": 1,
}


def _forward(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return network(x)


def test_learner_safetensors_and_state_dict_give_identical_networks():
    learner = load_model_file(LEARNER)
    safe = load_model_file(SAFETENSORS)
    state = load_model_file(STATE_DICT, arch=UNET)
    loaders = (learner.loader, safe.loader, state.loader)
    assert loaders == ("fastai_learner", "safetensors", "state_dict")
    assert learner.arch == {"class": "monai.networks.nets.unet.UNet"}
    assert safe.arch["arch_id"] == "monai.unet"
    assert safe.arch["arch_kwargs"]["channels"] == [8, 16, 32, 64]
    assert safe.inference_config["output"]["activation"] == "softmax"
    assert learner.inference_config is None and state.arch == UNET
    x = torch.randn(1, 1, 48, 48, 32, generator=torch.Generator().manual_seed(0))
    reference = _forward(learner.network, x)
    assert reference.shape == (1, 2, 48, 48, 32)
    for other in (safe, state):
        assert not other.network.training
        assert torch.equal(_forward(other.network, x), reference)
    # a model.arch overrides the safetensors arch_id and gives the same network
    assert torch.equal(_forward(load_model_file(SAFETENSORS, arch=UNET).network, x), reference)


def test_file_errors_name_the_file_and_the_fix(tmp_path: Path):
    with pytest.raises(SourceError, match=r"state dict: model\.arch is required"):
        load_model_file(STATE_DICT)
    with pytest.raises(SourceError, match="is not a model .*TorchScript"):
        load_model_file(RUN / "patch_config.json")
    with pytest.raises(SourceError, match="is not a model .*holds a list"):
        torch.save([1, 2], tmp_path / "list.pt")
        load_model_file(tmp_path / "list.pt")
    evil = tmp_path / "evil.pkl"
    torch.save({"net": torch.nn.Identity(), "x": len}, evil)
    with pytest.raises(SourceError, match=rf"{evil}: refused to unpickle global 'builtins\.len'"):
        load_model_file(evil)
    odd = tmp_path / "odd.safetensors"
    save_file({"w": torch.zeros(1)}, str(odd), metadata={"arch_id": "monai.nope"})
    with pytest.raises(SourceError, match="unknown arch_id 'monai.nope' .*monai.unet"):
        load_model_file(odd)
    with pytest.raises(SourceError, match="weights do not fit"):
        load_model_file(STATE_DICT, arch={**UNET, "channels": [4, 8, 16, 32]})


def test_a_training_library_layer_inside_the_network_is_refused(tmp_path: Path, monkeypatch):
    fake = types.ModuleType("fastai.layers")  # stands in for fastai, which is not installed

    class ConvLayer(torch.nn.Sequential):
        pass

    ConvLayer.__module__, ConvLayer.__qualname__ = "fastai.layers", "ConvLayer"
    fake.ConvLayer = ConvLayer
    monkeypatch.setitem(sys.modules, "fastai", types.ModuleType("fastai"))
    monkeypatch.setitem(sys.modules, "fastai.layers", fake)
    torch.save(torch.nn.Sequential(torch.nn.Conv3d(1, 1, 1), ConvLayer()), tmp_path / "net.pt")
    monkeypatch.delitem(sys.modules, "fastai.layers")
    with pytest.raises(SourceError, match="layer '1' .*placeholder for fastai.layers.ConvLayer"):
        load_model_file(tmp_path / "net.pt")


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_is_loaded_by_content_not_name(tmp_path: Path):
    scripted = torch.jit.script(torch.nn.Conv3d(1, 2, 1))
    path = tmp_path / "model.pkl"  # misleading name on purpose
    scripted.save(str(path))
    loaded = load_model_file(path)
    assert loaded.loader == "torchscript"
    x = torch.randn(1, 1, 4, 4, 4)
    assert torch.equal(_forward(loaded.network, x), _forward(scripted, x))


def test_a_corrupt_safetensors_file_says_what_is_wrong_with_it(tmp_path: Path):
    source = (RUN / "model" / "best_model.safetensors").read_bytes()
    header = int.from_bytes(source[:8], "little")
    corrupt = {  # name -> (bytes, what the one line says)
        "short_data": (source[:-1000], "unreadable safetensors file ("),
        "huge_length": ((1 << 62).to_bytes(8, "little") + source[8:], "header length 46116"),
        "cut_header": (source[: 8 + header // 2], "more than the file holds after it"),
        "bad_json": (source[:8] + b'{"x' + b" " * (header - 3) + source[8 + header :], "header ("),
    }
    for name, (data, expected) in corrupt.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(SourceError) as raised:
            load_model_file(path)
        message = str(raised.value)
        assert message.startswith(f"{path}: ") and expected in message, message
        assert "safetensors" in message and "\n" not in message and "unpickling" not in message


def test_metadata_describing_a_huge_network_is_refused_before_any_allocation(tmp_path: Path):
    """A file's arch_kwargs decide what gets allocated: 120 GiB of UNet from a 16-byte file
    would exhaust the memory; it is measured on the meta device and refused."""
    arch = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "strides": [2, 2, 2]}
    arch["channels"] = [4096, 8192, 16384, 32768]
    path = tmp_path / "huge.safetensors"
    save_file(
        {"w": torch.zeros(4)},
        str(path),
        metadata={"arch_id": "monai.unet", "arch_kwargs": json.dumps(arch)},
    )
    with pytest.raises(SourceError, match=r"arch_kwargs describe a network of 120962 MiB"):
        load_model_file(path)

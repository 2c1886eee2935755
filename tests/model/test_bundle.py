"""Reading a bundle folder and loading its network (`model.bundle`): the fixture's real configs,
tiny bundles, and every bad input as a one-line error with nothing loaded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from bundles import inference_config, threshold_state, write_bundle
from conftest import REPO

from evalharness.errors import SourceError
from evalharness.model.bundle import BundleNetwork, load_bundle_network, read_bundle

SPLEEN = REPO / "tests" / "fixtures" / "monai-bundle-spleen" / "bundle"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_spleen_bundle_reads_without_running_its_code() -> None:
    bundle = read_bundle(SPLEEN)
    assert (bundle.name, bundle.version, bundle.weights) == (
        "Spleen CT segmentation",
        "0.5.9",
        "models/model.pt",
    )
    assert dict(bundle.files) == {
        "configs/inference.json": sha(SPLEEN / "configs/inference.json"),
        "models/model.pt": sha(SPLEEN / "models/model.pt"),
        "configs/metadata.json": sha(SPLEEN / "configs/metadata.json"),
    }
    assert bundle.network_def["_target_"] == "UNet"
    assert [t["_target_"] for t in bundle.preprocessing["transforms"]][2:4] == [
        "Orientationd",
        "Spacingd",
    ]
    assert bundle.preprocessing["transforms"][0]["keys"] == "image"  # @image_key inlined
    loaded = load_bundle_network(bundle)
    assert loaded.loader == "bundle_state_dict"
    assert isinstance(loaded.network, BundleNetwork) and loaded.network.in_channels == 1
    expected = torch.load(SPLEEN / "models/model.pt", weights_only=True)
    state = loaded.network.network.state_dict()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_a_yaml_config_reads_like_json(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b")
    (root / "configs" / "inference.json").unlink()
    (root / "configs" / "inference.yaml").write_text(yaml.safe_dump(inference_config()))
    bundle = read_bundle(root)
    assert bundle.config_file == "configs/inference.yaml"
    assert bundle.network_def["_target_"] == "torch.nn.Conv3d"


def test_torchscript_when_that_is_all_there_is(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", torchscript=True)
    bundle = read_bundle(root)
    assert bundle.weights == "models/model.ts" and bundle.network_def is None
    loaded = load_bundle_network(bundle)
    assert loaded.loader == "bundle_torchscript"
    image = torch.tensor([0.0, 0.4, 0.6, 1.0]).view(1, 1, 4, 1, 1)
    logits = loaded.network(image)
    assert torch.equal(logits[0, 1] - logits[0, 0] > 0, image[0, 0] >= 0.5)


def test_no_inference_config(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b")
    (root / "configs" / "inference.json").unlink()
    with pytest.raises(SourceError) as raised:
        read_bundle(root)
    assert str(raised.value) == (
        f"{root}: no configs/inference.json (or inference.yaml, inference.yml); expected a MONAI "
        "bundle folder"
    )


def test_a_needed_id_missing(tmp_path: Path) -> None:
    config = inference_config()
    del config["inferer"]
    root = write_bundle(tmp_path / "b", config)
    with pytest.raises(
        SourceError,
        match=r"configs/inference.json: no id 'inferer'; the evaluation needs network_def, "
        r"preprocessing, inferer, postprocessing",
    ):
        read_bundle(root)


def test_an_expression_in_a_needed_id_without_trust(tmp_path: Path) -> None:
    config = inference_config()
    config["inferer"]["overlap"] = "$0.25 * 2"
    root = write_bundle(tmp_path / "b", config)
    with pytest.raises(SourceError) as raised:
        read_bundle(root)
    assert str(raised.value) == (
        "bundle id 'inferer::overlap': a $ expression is Python: '$0.25 * 2' (the bundle's code "
        "does not run unless model.trust_bundle=true)"
    )
    assert read_bundle(root, trusted=True).inferer["overlap"] == 0.5


def test_a_disallowed_target_without_trust(tmp_path: Path) -> None:
    config = inference_config()
    config["network_def"] = {"_target_": "my_package.Net", "channels": 2}
    root = write_bundle(tmp_path / "b", config)
    with pytest.raises(
        SourceError,
        match=r"bundle id 'network_def::_target_': a _target_ must name a class inside monai or "
        r"torch: 'my_package.Net'",
    ):
        read_bundle(root)


def test_weights_that_do_not_fit_network_def(tmp_path: Path) -> None:
    state = threshold_state()
    state["extra.weight"] = torch.zeros(1)
    del state["bias"]
    root = write_bundle(tmp_path / "b", state=state)
    bundle = read_bundle(root)
    with pytest.raises(SourceError) as raised:
        load_bundle_network(bundle)
    message = str(raised.value)
    assert message.startswith(f"{root / 'models/model.pt'}: weights do not fit network_def")
    assert "1 missing ['bias']" in message and "1 unexpected ['extra.weight']" in message


def test_weights_of_another_shape(tmp_path: Path) -> None:
    state = torch.nn.Conv3d(1, 3, 1).state_dict()
    root = write_bundle(tmp_path / "b", state=state)
    with pytest.raises(SourceError, match=r"2 of another shape \['bias', 'weight'\]"):
        load_bundle_network(read_bundle(root))


def test_torchscript_that_fails_to_load(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b", torchscript=True)
    path = root / "models" / "model.ts"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SourceError, match=rf"^{path}: cannot load TorchScript \("):
        load_bundle_network(read_bundle(root))


def test_a_pickle_that_is_not_a_state_dict_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    root = write_bundle(tmp_path / "b")
    torch.save({"weight": Payload()}, root / "models" / "model.pt")
    with pytest.raises(SourceError, match="refused to unpickle"):
        load_bundle_network(read_bundle(root))
    assert not marker.exists()


def test_no_weights(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b")
    (root / "models" / "model.pt").unlink()
    with pytest.raises(SourceError, match=r"no models/model.pt \(or models/model.ts\)"):
        read_bundle(root)


def test_malformed_config(tmp_path: Path) -> None:
    root = write_bundle(tmp_path / "b")
    (root / "configs" / "inference.json").write_text("{not json")
    with pytest.raises(SourceError, match="cannot read the bundle config"):
        read_bundle(root)

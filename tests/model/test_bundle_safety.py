"""The checked, closed reading of a bundle config's needed ids (`model.bundle_safety`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from evalharness.errors import SourceError
from evalharness.model.bundle_safety import allowed_class, closed_config, instantiate


def parser(config: dict) -> ConfigParser:
    found = ConfigParser(config)
    found.resolve_macro_and_relative_ids()
    return found


def test_references_are_inlined_and_literals_kept() -> None:
    config = {
        "key": "image",
        "scale": {
            "_target_": "ScaleIntensityRanged",
            "keys": "@key",
            "a_min": -57,
            "a_max": 164,
            "b_min": 0,
            "b_max": 1,
            "clip": True,
        },
        "pre": {
            "_target_": "Compose",
            "transforms": ["@scale", {"_target_": "EnsureTyped", "keys": "@key"}],
        },
    }
    closed = closed_config(parser(config), "pre")
    assert closed["transforms"][0]["keys"] == "image"
    assert closed["transforms"][0]["a_min"] == -57
    assert closed["transforms"][1] == {"_target_": "EnsureTyped", "keys": "image"}
    compose = instantiate(closed, "pre")
    assert [type(t).__name__ for t in compose.transforms] == ["ScaleIntensityRanged", "EnsureTyped"]


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("$__import__('os').getcwd()", "a $ expression is Python"),
        ({"_target_": "os.system", "command": "true"}, "a _target_ must name a class"),
        ({"_target_": "torch.save", "obj": 1, "f": "x.pt"}, "a _target_ must name a class"),
        ({"_target_": "collections.OrderedDict"}, "a _target_ must name a class"),
        ({"_target_": "UNet", "_mode_": "callable"}, "only the default _mode_"),
        ({"_target_": "LoadImaged", "keys": "image", "reader": "subprocess.Popen"}, "dotted name"),
    ],
)
def test_refused_without_trust_naming_the_id_and_value(value, named) -> None:
    config = {"net": {"_target_": "Compose", "transforms": [value]}}
    with pytest.raises(SourceError) as raised:
        closed_config(parser(config), "net")
    message = str(raised.value)
    assert named in message and "model.trust_bundle=true" in message
    assert "bundle id 'net::transforms::0" in message
    assert "\n" not in message


def test_a_referenced_id_is_checked_too() -> None:
    config = {"device": "$torch.device('cpu')", "net": {"_target_": "UNet", "device": "@device"}}
    with pytest.raises(SourceError, match=r"bundle id 'device': a \$ expression is Python"):
        closed_config(parser(config), "net")


def test_trusted_evaluates_the_needed_expressions_only(tmp_path: Path) -> None:
    needed, unneeded = tmp_path / "needed", tmp_path / "unneeded"
    config = {
        "other": f"$open('{unneeded}', 'w').write('x')",
        "pre": {
            "_target_": "ScaleIntensityRanged",
            "keys": "image",
            "a_min": f"$open('{needed}', 'w').write('x') - 58",
            "a_max": 164,
            "b_min": 0,
            "b_max": 1,
        },
    }
    closed = closed_config(parser(config), "pre", trusted=True)
    assert closed["a_min"] == -57
    assert needed.exists() and not unneeded.exists()


def test_skipped_components_are_neither_checked_nor_evaluated(tmp_path: Path) -> None:
    marker = tmp_path / "written"
    config = {
        "out": f"$open('{marker}', 'w').write('x')",
        "post": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@out"},
            ],
        },
    }
    skip = lambda where, value: value.get("_target_") == "SaveImaged"  # noqa: E731
    for trusted in (False, True):
        closed = closed_config(parser(config), "post", trusted=trusted, skip=skip)
        assert closed["transforms"][1]["output_dir"] == "@out"
    assert not marker.exists()


def test_missing_reference_and_cycle_are_one_line_errors() -> None:
    with pytest.raises(SourceError, match="id 'nowhere' not found"):
        closed_config(parser({"a": {"_target_": "UNet", "x": "@nowhere"}}), "a")
    with pytest.raises(SourceError, match="circular reference"):
        closed_config(parser({"a": {"_target_": "Compose", "transforms": ["@b"]}, "b": "@a"}), "a")


def test_allowed_classes() -> None:
    assert allowed_class("UNet").__name__ == "UNet"
    assert allowed_class("torch.nn.Conv3d").__name__ == "Conv3d"
    assert allowed_class("torch.save") is None
    assert allowed_class("os.system") is None
    assert allowed_class("NoSuchThing") is None

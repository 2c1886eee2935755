"""Tests of config.rules and config.validate: each rule once, its error naming the key."""

from __future__ import annotations

import pytest

from evalharness.config import rules
from evalharness.config.rules import overlap_to_voxels
from evalharness.config.schema import EvalConfig, from_mapping
from evalharness.config.validate import validate
from evalharness.errors import ConfigError


@pytest.mark.parametrize(
    ("overlap", "patch", "expected"),
    [
        (0.5, (48, 48, 32), (24, 24, 16)),
        (0.3, (48, 40, 30), (14, 12, 8)),  # int(48*.3)=14, int(40*.3)=12, int(30*.3)=9 -> 8
        (7, (16, 16, 16), (6, 6, 6)),
        (12.0, (16, 16, 16), (12, 12, 12)),
        (1.0, (16, 16, 16), (0, 0, 0)),  # not a fraction: 1 voxel, made even
        ([4, 5, 0], (16, 16, 16), (4, 4, 0)),
    ],
)
def test_overlap_to_voxels_follows_fastmonai(overlap, patch, expected):
    assert overlap_to_voxels(overlap, patch) == expected


@pytest.mark.parametrize("overlap", [-2, 16, [2, 2], [0, 0, 40]])
def test_overlap_rule_rejects_bad_values(overlap):
    with pytest.raises(ConfigError, match="patch.overlap"):
        rules.overlap("patch.overlap", overlap, (16, 16, 32))


def test_overlap_voxels_the_fastmonai_way():
    assert overlap_to_voxels(0.5, (96, 96, 64)) == (48, 48, 32)
    assert overlap_to_voxels(0.3, (32, 32, 16)) == (8, 8, 4)  # 9.6 -> 9 -> 8, 4.8 -> 4
    assert overlap_to_voxels(17, (96, 96, 96)) == (16, 16, 16)
    assert overlap_to_voxels([8, 9, 0], (96, 96, 96)) == (8, 8, 0)
    assert overlap_to_voxels(0.0, (96, 96, 96)) == (0, 0, 0)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"data": {"split": {"method": "kfold"}}}, "data.split.method='kfold': expected one of"),
        ({"data": {"limit": 0}}, "data.limit=0: expected a positive integer or null"),
        ({"model": {"run_id": "a", "uri": "runs:/x/y"}}, "model: set only one of run_id, uri"),
        ({"patch": {"size": [8, 8, 8], "overlap": 8}}, "patch.overlap=8: an overlap in voxels"),
        ({"preprocessing": {"target_spacing": [1, 0, 1]}}, "preprocessing.target_spacing="),
        ({"inference": {"threshold": 1.5}}, "inference.threshold=1.5: expected a probability"),
        ({"inference": {"tta": "yes"}}, "inference.tta='yes': expected false, true"),
    ],
)
def test_validate_names_the_key(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        validate(from_mapping(EvalConfig, values))


def test_validate_accepts_the_defaults():
    validate(EvalConfig())

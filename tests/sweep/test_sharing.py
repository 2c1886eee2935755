"""Forward-pass sharing: settings that differ only after the forward passes, evaluated one after
another with one sweep cache, get exactly the per-case results they get alone, and the forward
passes of their group run once per case.

In process, on tiny real inputs: a 3x3x3 convolution (zero-padded, so a voxel's output depends
on where its patch lies: aggregation modes really differ) over three cases whose images hold a
ball (the label) and a small cube that only keep-largest-component removes.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from blur import FLIPS, N_CASES, PATCHES_PER_CASE, SWEEPS, evaluate_settings
from blur import inputs as inputs  # noqa: F401 - the shared fixture

from evalharness.score.metrics import METRIC_NAMES
from evalharness.sweep.cache import SweepCache


@pytest.mark.parametrize("dimension", sorted(SWEEPS))
def test_shared_settings_get_what_they_get_alone(inputs, tmp_path: Path, dimension: str) -> None:
    settings = SWEEPS[dimension]
    alone = evaluate_settings(inputs, tmp_path / "alone", f"alone-{dimension}", settings, None)
    cache = SweepCache(64 * 2**20)
    shared = evaluate_settings(inputs, tmp_path / "shared", f"shared-{dimension}", settings, cache)
    columns = ["case", "label", *METRIC_NAMES, "status", "error", "flags"]
    for (one, _), (other, _) in zip(alone, shared, strict=True):
        pd.testing.assert_frame_equal(one[columns], other[columns], check_exact=True)
    patches = N_CASES * PATCHES_PER_CASE
    executed = [metrics["forward_passes"] for _, metrics in shared]
    reused = [metrics["forward_passes_reused"] for _, metrics in shared]
    assert [m["forward_passes"] for _, m in alone] == [
        patches * FLIPS.get(s[0], 1) for s in settings
    ]
    assert {m["forward_passes_reused"] for _, m in alone} == {0}
    if dimension == "tta":  # the identity once; the flips 0 and 2 once; the other 5 once
        assert executed == [patches, 2 * patches, 5 * patches]
        assert reused == [0, patches, 3 * patches]
    else:  # one set of forward passes for the whole group
        assert executed == [patches] + [0] * (len(settings) - 1)
        assert reused == [0] + [patches] * (len(settings) - 1)
    if dimension == "aggregation":  # the modes really differ on this model
        assert len({round(m["dsc_mean"], 12) for _, m in shared}) > 1
    if dimension == "keep_largest":
        assert shared[0][1]["precision_mean"] < shared[1][1]["precision_mean"]


def test_reused_cost_counts_the_forward_passes_it_did_not_pay(inputs, tmp_path: Path) -> None:
    """`seconds` (alone) = `seconds_paid` + the measured time of the reused forward passes:
    the first setting pays them, the second does not, and both report their cost alone."""
    settings = SWEEPS["keep_largest"]
    cache = SweepCache(64 * 2**20)
    (first, first_metrics), (second, second_metrics) = evaluate_settings(
        inputs, tmp_path, "cost", settings, cache
    )
    assert (first["seconds"] == first["seconds_paid"]).all()
    assert (second["seconds"] > second["seconds_paid"]).all()
    for metrics in (first_metrics, second_metrics):
        assert metrics["peak_device_memory_mb"] > 0
        assert metrics["seconds_per_case"] >= metrics["seconds_per_case_paid"]


def test_a_case_whose_patches_do_not_fit_is_recomputed(inputs, tmp_path: Path) -> None:
    """A budget below one case's patch outputs (4 patches x 512 voxels x 4 bytes) keeps none:
    every setting runs its own forward passes, and the results are the same."""
    settings = SWEEPS["aggregation"][:2]
    alone = evaluate_settings(inputs, tmp_path / "alone", "tight-alone", settings, None)
    shared = evaluate_settings(inputs, tmp_path / "shared", "tight", settings, SweepCache(4096))
    patches = N_CASES * PATCHES_PER_CASE
    assert [m["forward_passes"] for _, m in shared] == [patches, patches]
    assert [m["forward_passes_reused"] for _, m in shared] == [0, 0]
    for (one, _), (other, _) in zip(alone, shared, strict=True):
        assert one["dsc"].tolist() == other["dsc"].tolist()

"""A sweep group in one pass over the cases (`sweep.group_pass`): every setting gets exactly the
per-case results it gets alone, the forward passes run once per case and flip even when the
cache holds only one case, and an interrupted group resumes every setting where it stopped.

In process, on the real inputs of `tests/blur.py` (a blurring convolution over three cases
with a ball and a stray cube).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from blur import FLIPS, N_CASES, PATCHES_PER_CASE, SWEEPS, evaluate_settings
from blur import inputs as inputs  # noqa: F401 - the shared fixture
from mlflow.tracking import MlflowClient
from tiny import base_overrides, compose_config

from evalharness.cli import config_from
from evalharness.data.datasets import Case
from evalharness.predict.family import ModelFamily
from evalharness.predict.preprocess import PreprocessSettings
from evalharness.score.metrics import METRIC_NAMES
from evalharness.sweep.cache import SweepCache
from evalharness.sweep.group_pass import Member, evaluate_group

COLUMNS = ["case", "label", *METRIC_NAMES, "status", "error", "flags"]
ONE_CASE_OF_PATCHES = PATCHES_PER_CASE * 8**3 * 4  # float32 outputs of one case, one flip


def members(inputs, out: Path, experiment: str, settings: list[list[str]], *extra: str):
    uri, model, root = inputs
    base = base_overrides(uri, model, root, experiment)
    return [
        Member(
            config_from(compose_config(*base, "output.plots=false", *extra, *overrides)),
            out / str(index),
        )
        for index, overrides in enumerate(settings)
    ]


def tables(inputs, results, out: Path) -> list[tuple[pd.DataFrame, dict[str, float]]]:
    client = MlflowClient(tracking_uri=inputs[0])
    found = []
    for index, result in enumerate(results):
        assert result.outcome.code == 0 and not result.outcome.skipped
        scratch = out / f"read{index}"
        scratch.mkdir(parents=True)
        path = client.download_artifacts(result.outcome.run_id, "per_case.csv", str(scratch))
        found.append((pd.read_csv(path), client.get_run(result.outcome.run_id).data.metrics))
    return found


@pytest.mark.parametrize("dimension", sorted(SWEEPS))
def test_group_settings_get_what_they_get_alone(inputs, tmp_path: Path, dimension: str) -> None:  # noqa: F811
    settings = SWEEPS[dimension]
    alone = evaluate_settings(inputs, tmp_path / "alone", f"g-alone-{dimension}", settings, None)
    group = members(inputs, tmp_path / "group", f"g-{dimension}", settings)
    shared = tables(inputs, evaluate_group(group, SweepCache(64 * 2**20)), tmp_path)
    for (one, _), (other, _) in zip(alone, shared, strict=True):
        pd.testing.assert_frame_equal(one[COLUMNS], other[COLUMNS], check_exact=True)
    patches = N_CASES * PATCHES_PER_CASE
    executed = [metrics["forward_passes"] for _, metrics in shared]
    reused = [metrics["forward_passes_reused"] for _, metrics in shared]
    if dimension == "tta":  # the identity once; the flips 0 and 2 once; the other 5 once
        assert executed == [patches, 2 * patches, 5 * patches]
        assert reused == [0, patches, 3 * patches]
        assert sum(executed) == patches * FLIPS["inference.tta=true"]
    else:  # one set of forward passes for the whole group
        assert executed == [patches] + [0] * (len(settings) - 1)
        assert reused == [0] + [patches] * (len(settings) - 1)
    for (table, metrics), paid_forward in zip(shared, executed, strict=True):
        assert (table["seconds"] >= table["seconds_paid"]).all()
        assert metrics["seconds_per_case"] >= metrics["seconds_per_case_paid"]
        assert (paid_forward == 0) == (metrics["forward_passes"] == 0)


def test_a_budget_of_one_case_still_shares_every_case(inputs, tmp_path: Path) -> None:  # noqa: F811
    """Case by case, the group needs one case's patch outputs at a time: with a budget below
    the three cases' outputs (setting after setting would have to recompute them all), the
    forward passes still run once per case."""
    budget = ONE_CASE_OF_PATCHES + 4 * 2**10 * 3  # one case's outputs, a few cases' inputs
    assert budget < N_CASES * ONE_CASE_OF_PATCHES
    settings = SWEEPS["aggregation"]
    group = members(inputs, tmp_path, "one-case", settings)
    results = evaluate_group(group, SweepCache(budget))
    shared = tables(inputs, results, tmp_path)
    patches = N_CASES * PATCHES_PER_CASE
    assert [m["forward_passes"] for _, m in shared] == [patches, 0, 0, 0]
    used = [result.cache_used for result in results]
    assert [u.patch_stores for u in used] == [N_CASES, 0, 0, 0]
    assert [u.patch_hits for u in used] == [0] + [N_CASES] * 3
    assert [u.case_loads for u in used] == [N_CASES, 0, 0, 0]
    assert [u.case_hits for u in used] == [0] + [N_CASES] * 3


class InterruptedCache(SweepCache):
    """A real cache whose process is stopped (Ctrl-C) when it starts reading case `stop_at`."""

    def __init__(self, stop_at: str) -> None:
        super().__init__(64 * 2**20)
        self.stop_at = stop_at

    def load_inputs(
        self, case: Case, settings: PreprocessSettings, family: ModelFamily | None = None
    ):
        if case.case_id == self.stop_at:
            raise KeyboardInterrupt("stopped")
        return super().load_inputs(case, settings, family)


def test_an_interrupted_group_resumes_each_setting_where_it_stopped(inputs, tmp_path: Path) -> None:  # noqa: F811
    settings = SWEEPS["keep_largest"]
    alone = evaluate_settings(inputs, tmp_path / "alone", "resume-alone", settings, None)
    group = members(inputs, tmp_path / "group", "resume", settings, "run.prefetch=false")
    with pytest.raises(KeyboardInterrupt):
        evaluate_group(group, InterruptedCache(stop_at=f"c{N_CASES - 1}"))
    client = MlflowClient(tracking_uri=inputs[0])
    experiment = client.get_experiment_by_name("resume").experiment_id
    killed = client.search_runs([experiment])
    assert sorted(r.info.status for r in killed) == ["KILLED"] * len(settings)
    results = evaluate_group(group, SweepCache(64 * 2**20))
    resumed = tables(inputs, results, tmp_path)
    killed_ids = {r.info.run_id for r in killed}
    for result in results:
        run = client.get_run(result.outcome.run_id)
        assert run.data.tags["evalharness.resumed_from"] in killed_ids
    assert [m["forward_passes"] for _, m in resumed] == [PATCHES_PER_CASE, 0]  # the last case
    assert [m["forward_passes_reused"] for _, m in resumed] == [0, PATCHES_PER_CASE]
    for (one, _), (other, _) in zip(alone, resumed, strict=True):
        pd.testing.assert_frame_equal(one[COLUMNS], other[COLUMNS], check_exact=True)


def test_members_with_other_preprocessing_get_a_pass_of_their_own(inputs, tmp_path: Path) -> None:  # noqa: F811
    """Settings of one group share their preprocessing; given one that differs, it gets its
    own pass over the cases, and every setting still gets what it gets alone."""
    settings = [
        ["inference.aggregation=hann"],
        ["inference.aggregation=crop"],
        ["inference.aggregation=hann", "preprocessing.apply_reorder=false"],
    ]
    alone = evaluate_settings(inputs, tmp_path / "alone", "pre-alone", settings, None)
    group = members(inputs, tmp_path / "group", "pre", settings)
    shared = tables(inputs, evaluate_group(group, SweepCache(64 * 2**20)), tmp_path)
    patches = N_CASES * PATCHES_PER_CASE
    assert [m["forward_passes"] for _, m in shared] == [patches, 0, patches]
    for (one, _), (other, _) in zip(alone, shared, strict=True):
        pd.testing.assert_frame_equal(one[COLUMNS], other[COLUMNS], check_exact=True)

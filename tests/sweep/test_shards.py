"""``data.shard=<k>/<n>``: every n-th case in a stable order, and the sweep's comparison merging
a setting's shards into one row over all its cases (a failed shard's cases marked missing)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from test_sharing import inputs  # noqa: F401  (the module's tiny model and cases)
from tiny import base_overrides, compose_config

from evalharness.cli import config_from
from evalharness.config.schema import DataConfig
from evalharness.config.validate import validate
from evalharness.data.datasets import Case, shard_cases
from evalharness.errors import ConfigError, DataError
from evalharness.evaluation.run import evaluate
from evalharness.score.comparison import JobRecord, RunData, compare
from evalharness.score.metrics import METRIC_NAMES
from evalharness.score.shards import merge_shards


def _cases(ids: list[str]) -> list[Case]:
    return [Case(case_id=i, image=Path(f"{i}.nii.gz"), label=None) for i in ids]


def test_shards_partition_the_split_in_a_stable_order() -> None:
    ids = ["c7", "a1", "b3", "c2", "a9"]
    shards = [[c.case_id for c in shard_cases(_cases(ids), k, 2)] for k in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(ids)
    assert shards == [
        ["c7", "a1", "b3"],
        ["c2", "a9"],
    ]  # ids a1 a9 b3 c2 c7 alternate; split order kept
    reordered = [[c.case_id for c in shard_cases(_cases(ids[::-1]), k, 2)] for k in range(2)]
    assert [sorted(s) for s in reordered] == [sorted(s) for s in shards]
    with pytest.raises(DataError, match=r"data.shard=5/6: no cases in this shard"):
        shard_cases(_cases(ids), 5, 6)


@pytest.mark.parametrize("value", ["2/2", "1", "a/2", "-1/3"])
def test_a_bad_shard_names_the_key(value: str) -> None:
    from evalharness.config.schema import EvalConfig

    config = EvalConfig(data=DataConfig(shard=value))
    with pytest.raises(ConfigError, match=rf"^data.shard='{value}': expected k/n"):
        validate(config)


def _evaluate(inputs, out: Path, experiment: str, *overrides: str) -> tuple[str, RunData, list]:  # noqa: F811
    uri, model, root = inputs
    base = base_overrides(uri, model, root, experiment)
    config = config_from(compose_config(*base, "output.plots=false", *overrides))
    outcome = evaluate(config, out)
    client = MlflowClient(tracking_uri=uri)
    path = client.download_artifacts(outcome.run_id, "per_case.csv", str(out))
    run = client.get_run(outcome.run_id)
    data = RunData(dict(run.data.metrics), dict(run.data.tags), pd.read_csv(path))
    return outcome.run_id, data, list(outcome.case_ids)


def test_merged_shards_equal_the_unsharded_evaluation(inputs, tmp_path: Path) -> None:  # noqa: F811
    whole_id, whole, whole_cases = _evaluate(inputs, tmp_path / "whole", "whole")
    runs, records = {}, []
    for k in range(2):
        run_id, data, cases = _evaluate(inputs, tmp_path / f"s{k}", "shards", f"data.shard={k}/2")
        assert 0 < len(cases) < len(whole_cases)
        runs[run_id] = data
        records.append(JobRecord(k, "all", {}, "finished", 0, run_id, shard=f"{k}/2", cases=cases))
    merged = compare(*merge_shards(records, runs), "dsc_mean")
    [row] = merged.table.to_dict("records")
    assert row["status"] == "finished" and row["shards"] == "0/2,1/2"
    for name in [f"{m}_{s}" for m in METRIC_NAMES for s in ("mean", "std", "median")]:
        expected, got = whole.metrics[name], row[name]
        assert (math.isnan(expected) and math.isnan(got)) or math.isclose(got, expected), name
    assert row["n_cases"] == whole.metrics["n_cases"] == len(whole_cases)
    assert row["forward_passes"] == whole.metrics["forward_passes"]
    columns = ["case", "label", *METRIC_NAMES, "status"]
    long = merged.per_case_long.drop(columns="setting")[columns]
    expected = whole.per_case.sort_values(["case", "label"], ignore_index=True)[columns]
    pd.testing.assert_frame_equal(long, expected, check_exact=True)
    # shard 1 failed: its cases are missing from the merged row, counted as failed, not dropped
    failed = [
        records[0],
        JobRecord(1, "all", {}, "failed", 1, None, "boom", "1/2", records[1].cases),
    ]
    broken = compare(*merge_shards(failed, runs), "dsc_mean")
    [row] = broken.table.to_dict("records")
    assert row["status"] == "cases_failed"
    assert "shard 1/2: boom" in row["error"]
    assert row["n_cases"] == len(whole_cases)
    assert row["n_failed_cases"] == len(records[1].cases)
    missing = broken.per_case_long[broken.per_case_long["status"] == "missing"]
    assert sorted(missing["case"]) == sorted(records[1].cases)

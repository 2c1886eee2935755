"""The sweep's refresh reads an ended child run once per process, a running one every time;
between jobs it waits for its interval."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from evalharness.score.comparison import JobRecord
from evalharness.sweep import parent_report
from evalharness.sweep.callback import REFRESH_AFTER_S, SweepCallback
from evalharness.sweep.state import STATE_DIR, SweepState, write_json
from evalharness.track import tracking


def _child(client, experiment: str, tmp_path: Path, name: str, dsc: float) -> str:
    run_id = tracking.create_run(client, experiment, name, {})
    csv = tmp_path / name / "per_case.csv"
    csv.parent.mkdir()
    rows = [{"case": f"c{i}", "label": 1, "status": "ok", "dsc": dsc + i / 100} for i in range(3)]
    pd.DataFrame(rows).to_csv(csv, index=False)
    tracking.log_file(client, run_id, csv)
    tracking.log_metrics(client, run_id, {"dsc_mean": dsc + 0.01, "n_cases": 3})
    return run_id


def test_an_ended_run_is_read_once_a_running_one_each_refresh(
    sqlite_uri: str, tmp_path: Path, monkeypatch
) -> None:
    client, experiment = tracking.open_experiment(sqlite_uri, "sweep")
    parent = tracking.create_run(client, experiment, "parent", {})
    ended = _child(client, experiment, tmp_path, "ended", 0.8)
    tracking.finish(client, ended, "FINISHED")
    running = _child(client, experiment, tmp_path, "running", 0.7)
    sweep_dir = tmp_path / "sweep"
    for num, (setting, run_id) in enumerate([("a=1", ended), ("a=2", running)]):
        record = JobRecord(num, setting, {"a": setting[2:]}, "finished", 0, run_id)
        write_json(sweep_dir / STATE_DIR / "jobs" / f"{num:05d}.json", record.to_dict())
    state = SweepState(parent, sqlite_uri, ("a",), "dsc_mean", plots=False)
    downloads: Counter[str] = Counter()
    download_csv = tracking.download_csv

    def counting(client, run_id, artifact, scratch):
        downloads[run_id] += 1
        return download_csv(client, run_id, artifact, scratch)

    monkeypatch.setattr(tracking, "download_csv", counting)
    monkeypatch.setattr(parent_report, "_ENDED_RUNS", {})
    first = parent_report.refresh(sweep_dir, state, final=False)
    tracking.finish(client, running, "FINISHED")  # ends after the first refresh: read again
    second = parent_report.refresh(sweep_dir, state, final=False)
    parent_report.refresh(sweep_dir, state, final=True)
    assert downloads == {ended: 1, running: 2}
    for comparison in (first, second):
        assert set(comparison.per_case_long["setting"]) == {"a=1", "a=2"}
        assert len(comparison.per_case_long) == 6
    assert first.table.equals(second.table)


def test_between_jobs_the_comparison_waits_for_the_refresh_interval(
    sqlite_uri: str, tmp_path: Path
) -> None:
    """A group's jobs end within a second of each other: the parent's comparison is refreshed
    after a job only once `REFRESH_AFTER_S` have passed, and always at the end."""
    client, experiment = tracking.open_experiment(sqlite_uri, "throttle")
    parent = tracking.create_run(client, experiment, "parent", {"evalharness.kind": "sweep"})
    callback = SweepCallback()
    callback.sweep_dir = tmp_path
    callback.state = SweepState(parent, sqlite_uri, ("inference.aggregation",), "dsc_mean", False)

    def end(num: int, value: str) -> list[str]:
        task = {"overrides": {"task": [f"inference.aggregation={value}"]}, "job": {"num": num}}
        failed = JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("boom"))
        callback.on_job_end(OmegaConf.create({"hydra": task}), failed)
        return sorted(pd.read_csv(tmp_path / "comparison.csv")["setting"])

    assert end(0, "hann") == ["aggregation=hann"]
    assert end(1, "crop") == ["aggregation=hann"]  # within the interval: not refreshed
    assert callback.refreshed_at is not None
    callback.refreshed_at -= REFRESH_AFTER_S
    assert end(2, "average") == ["aggregation=average", "aggregation=crop", "aggregation=hann"]
    end(3, "gaussian")
    assert callback._close(complete=True) == 1  # every job failed
    final = pd.read_csv(tmp_path / "comparison.csv")
    assert len(final) == 4 and set(final["status"]) == {"failed"}

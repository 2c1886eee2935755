"""tracking: local store URIs, artifact locations and table/param logging on real stores."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from conftest import REPO
from mlflow.tracking import MlflowClient

from evalharness.track import tracking


def test_local_store_uris_are_made_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cwd = Path.cwd()
    assert tracking.absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{cwd}/mlflow.db"
    assert tracking.absolute_tracking_uri("sqlite:////x/m.db") == "sqlite:////x/m.db"
    assert tracking.absolute_tracking_uri("mlruns") == (cwd / "mlruns").as_uri()
    assert tracking.absolute_tracking_uri("file:///x/mlruns") == "file:///x/mlruns"
    assert tracking.absolute_tracking_uri("http://host:5000") == "http://host:5000"
    assert tracking.local_store_path("sqlite:////x/m.db?timeout=5") == Path("/x/m.db")
    assert tracking.local_store_path("sqlite://") is None
    assert tracking.local_store_path("http://host:5000") is None


def test_sqlite_artifacts_live_next_to_the_database(tmp_path: Path, monkeypatch) -> None:
    """MLflow's default would drop artifacts into ./mlruns of whatever folder we run in."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    client = tracking.prepare_store(uri)
    experiment = tracking.experiment_id(client, uri, "exp")
    assert tracking.experiment_id(client, uri, "exp") == experiment
    run_id = client.create_run(experiment).info.run_id
    tracking.log_text(client, run_id, "hello", "notes/hello.txt")
    assert (tmp_path / "store" / "mlartifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()


def test_params_metrics_and_tables_round_trip(tracking_uri: str, tmp_path: Path) -> None:
    client = tracking.prepare_store(tracking_uri)
    run_id = client.create_run(tracking.experiment_id(client, tracking_uri, "e")).info.run_id
    params = tracking.flatten({"a": {"b": 1, "c": [1, 2]}, "long": "x" * 7000, "none": None})
    tracking.log_params(client, run_id, params)
    tracking.log_metrics(client, run_id, {"ok": 0.5, "nan": math.nan, "inf": math.inf})
    table = pd.DataFrame({"case": ["a", "b"], "dsc": [0.9, 0.8]})
    tracking.log_table(client, run_id, table, "per_case.json")
    tracking.finish(client, run_id, "FAILED", "bad  input\nsecond line")
    run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    assert run.data.params["a.b"] == "1" and run.data.params["a.c"] == "[1, 2]"
    assert run.data.params["none"] == "null" and len(run.data.params["long"]) == 6000
    assert run.data.metrics == {"ok": 0.5}
    assert run.info.status == "FAILED" and "bad" in run.data.tags["evalharness.error"]
    local = client.download_artifacts(run_id, "per_case.json", str(tmp_path))
    assert "0.9" in Path(local).read_text()
    assert tracking.download_csv(client, run_id, "missing.csv", tmp_path) is None


class CountingClient:
    """An `MlflowClient` that counts its artifact uploads."""

    def __init__(self, client: MlflowClient) -> None:
        self.client, self.calls = client, []

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None = None):
        self.calls.append(("folder", artifact_path))
        return self.client.log_artifacts(run_id, local_dir, artifact_path)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None = None):
        self.calls.append(("file", artifact_path))
        return self.client.log_artifact(run_id, local_path, artifact_path)


def artifact_files(client: MlflowClient, run_id: str, folder: str) -> set[str]:
    files = set()
    for entry in client.list_artifacts(run_id, folder):
        files |= artifact_files(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return files


def test_a_plots_folder_is_logged_in_one_call_at_the_same_paths(sqlite_uri, tmp_path) -> None:
    client = tracking.prepare_store(sqlite_uri)
    experiment = tracking.experiment_id(client, sqlite_uri, "e")
    folder = tmp_path / "plots"
    (folder / "gallery").mkdir(parents=True)
    paths = [folder / "metrics.png", folder / "gallery" / "label1_worst1_a.png"]
    for path in paths:
        path.write_bytes(b"png")
    expected = {"plots/metrics.png", "plots/gallery/label1_worst1_a.png"}
    counting = CountingClient(client)
    run_id = client.create_run(experiment).info.run_id
    tracking.log_folder(counting, run_id, folder, paths, "plots")
    assert counting.calls == [("folder", "plots")]
    assert artifact_files(client, run_id, "plots") == expected
    # a stale file of an earlier run in the folder: each file on its own, the stale one not
    (folder / "overlay_best_old.png").write_bytes(b"old")
    counting = CountingClient(client)
    run_id = client.create_run(experiment).info.run_id
    tracking.log_folder(counting, run_id, folder, paths, "plots")
    assert counting.calls == [("file", "plots"), ("file", "plots/gallery")]
    assert artifact_files(client, run_id, "plots") == expected


FIRST_USE = """
import sys, time
from pathlib import Path
from evalharness.track import tracking
go = Path(sys.argv[2])
Path(sys.argv[3]).touch()  # imported everything: ready
while not go.exists():
    time.sleep(0.01)
client, experiment = tracking.open_experiment(sys.argv[1], "evalharness")
run = tracking.create_run(client, experiment, "same", {})
tracking.finish(client, run, "FINISHED")
print("done", experiment)
"""


def test_two_processes_creating_the_same_sqlite_store_both_succeed(tmp_path: Path) -> None:
    """Store creation (MLflow migrates a new SQLite file when a client is made), experiment
    creation and the first run, started by two processes at the same moment (before the lock
    covered the client's creation, one of them failed every time)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for attempt in range(1):
        uri = f"sqlite:///{tmp_path / str(attempt) / 'outputs' / 'mlflow.db'}"
        go = tmp_path / f"go{attempt}"
        ready = [tmp_path / f"ready{attempt}_{i}" for i in range(2)]
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", FIRST_USE, uri, str(go), str(flag)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for flag in ready
        ]
        while not all(flag.exists() for flag in ready):  # both wait at the barrier
            assert all(p.poll() is None for p in processes), processes[0].communicate()
            time.sleep(0.05)
        go.touch()
        results = [p.communicate(timeout=300) for p in processes]
        for process, (out, err) in zip(processes, results, strict=True):
            assert process.returncode == 0, err.decode()[-3000:]
            assert out.decode().strip() == "done 1"
        client = MlflowClient(tracking_uri=uri)
        assert len(client.search_runs(["1"])) == 2

"""Sweeps through the real CLI on the tiny demo: parent and children in MLflow, the comparison,
resume, failing jobs, parallel launchers (joblib, submitit), signals, and what a real
`mlflow server` shows of it all. One SQLite store for the module, one experiment per test."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, sqlite_store
from hydra.core.utils import JobReturn, JobStatus
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from evalharness.score.comparison import JobRecord, RunData, compare, direction
from evalharness.sweep.callback import SweepCallback, close_orphaned_parents
from evalharness.sweep.state import SweepState, setting_of
from evalharness.track import tracking

GRID = ("patch.overlap=0.25,0.5", "inference.aggregation=hann,average")
GRID_NAMES = {
    "aggregation=hann,overlap=0.25",
    "aggregation=average,overlap=0.25",
    "aggregation=hann,overlap=0.5",
    "aggregation=average,overlap=0.5",
}
N_CASES = 4  # the tiny demo's cases with data.split.method=all


@dataclass(frozen=True)
class Store:
    workdir: Path
    uri: str
    demo_cache: Path


@pytest.fixture(scope="module")
def store(
    tmp_path_factory: pytest.TempPathFactory, migrated_sqlite: Path, tiny_demo_cache: Path
) -> Store:
    """One SQLite store shared by the module; the session's built demo."""
    workdir = tmp_path_factory.mktemp("sweeps")
    return Store(workdir, sqlite_store(migrated_sqlite, workdir / "mlflow.db"), tiny_demo_cache)


def _command(store: Store, experiment: str, name: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "evalharness",
        "-m",
        f"mlflow.tracking_uri={store.uri}",
        f"mlflow.experiment={experiment}",
        "demo.size=tiny",
        f"demo.cache_dir={store.demo_cache}",
        f"hydra.sweep.dir={store.workdir / 'sweeps' / name}",
        *overrides,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true", "PYTHONPATH": str(REPO / "src")}


def sweep(store: Store, experiment: str, name: str, *overrides: str):
    """Run ``python -m evalharness -m ...`` to the end."""
    return subprocess.run(
        _command(store, experiment, name, *overrides),
        cwd=store.workdir,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def runs(store: Store, experiment: str) -> tuple[MlflowClient, list[Run], list[Run]]:
    """(client, sweep parents oldest first, evaluation children oldest first)."""
    client = MlflowClient(tracking_uri=store.uri)
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in found if r.data.tags.get("evalharness.kind") == "sweep"]
    children = [r for r in found if r.data.tags.get("evalharness.kind") == "evaluation"]
    return client, parents, children


def artifact_table(client: MlflowClient, run_id: str, path: str, scratch: Path) -> pd.DataFrame:
    return pd.read_csv(client.download_artifacts(run_id, path, str(scratch)))


@pytest.fixture(scope="module")
def grid(store: Store, server):
    """The 2×2 sweep on the default (in-process) launcher, over the demo's 4 cases (the
    server starts meanwhile)."""
    result = sweep(store, "grid", "grid1", "data.split.method=all", *GRID)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_grid_sweep_has_parent_children_and_comparison(store: Store, grid, tmp_path) -> None:
    client, parents, children = runs(store, "grid")
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "grid1"
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.info.run_name for c in children} == GRID_NAMES
    table = artifact_table(client, parent.info.run_id, "comparison.csv", tmp_path)
    assert set(table["setting"]) == GRID_NAMES
    assert set(table["status"]) == {"finished"}
    assert set(table["run_id"]) == {c.info.run_id for c in children}
    assert {"patch.overlap", "inference.aggregation", "dsc_mean", "dsc_std", "dsc_median"} <= set(
        table.columns
    )
    assert (table["n_failed_cases"] == 0).all()
    assert set(table["preprocessing_mismatch"].astype(str).str.lower()) == {"false"}
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/compare_dsc.png", "plots/heatmap_dsc.png", "plots/paired_dsc.png"} <= plots
    stats = json.loads(
        Path(
            client.download_artifacts(parent.info.run_id, "comparison_stats.json", str(tmp_path))
        ).read_text()
    )
    best = table.loc[table["dsc_mean"].idxmax()]
    assert stats["best"]["setting"] == best["setting"]
    assert parent.data.tags["evalharness.best_setting"] == best["setting"]
    assert math.isclose(parent.data.metrics["best_dsc_mean"], best["dsc_mean"])
    assert [t["n_cases"] for t in stats["tests"]] == [N_CASES] * 3
    assert all(0 < t["p_value"] <= 1 for t in stats["tests"])
    ordered = sorted(stats["tests"], key=lambda t: t["p_value"])  # Holm: step-down, monotone
    assert [t["p_holm"] for t in ordered] == sorted(t["p_holm"] for t in ordered)
    assert all(t["p_holm"] >= t["p_value"] for t in ordered)
    assert stats["tied_with_best"][0] == best["setting"]
    tied = set(stats["tied_with_best"]) - {best["setting"]}
    assert tied == {t["setting"] for t in stats["tests"] if t["p_holm"] >= 0.05}
    assert parent.data.tags["evalharness.tied_with_best"] == "; ".join(stats["tied_with_best"])
    assert parent.data.metrics["n_tied_with_best"] == len(stats["tied_with_best"])
    assert "Best by dsc_mean" in grid.stdout and "Wilcoxon" in grid.stdout
    assert "Tied with the best (Holm-adjusted p >= 0.05)" in grid.stdout
    for child in children:  # each setting's run logs its intervals and the metric contract
        metrics = child.data.metrics
        assert metrics["dsc_mean_ci95_low"] <= metrics["dsc_mean"] <= metrics["dsc_mean_ci95_high"]
        assert child.data.params["metrics.missing"] == "worst"


def test_grid_sweep_loads_each_case_once(store: Store, grid) -> None:
    """The default launcher shares the model and preprocessed cases across the four jobs, and
    the model artifact is downloaded from the training run once."""
    _, _, children = runs(store, "grid")
    totals = {
        name: sum(c.data.metrics[f"cache.{name}"] for c in children)
        for name in ("model_loads", "model_hits", "case_loads", "case_hits")
    }
    assert totals == {
        "model_loads": 1,
        "model_hits": 3,
        "case_loads": N_CASES,
        "case_hits": 3 * N_CASES,
    }
    assert grid.stdout.count("cache: ") == 4
    downloads = [c.data.tags["evalharness.model_downloaded"] for c in children]
    assert sorted(downloads) == ["false", "false", "false", "true"]  # one download per sweep


class Server:
    """A real `mlflow server` on loopback against the store, in a process group of its own."""

    def __init__(self, store: Store) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = store.workdir / "server.log"
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store.uri]
        command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                command, cwd=store.workdir, stdout=log, stderr=log, start_new_session=True
            )

    def ready(self, timeout_s: float = 90) -> str:
        """The URL once ``/health`` answers (bounded wait)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self.url
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow server not ready after {timeout_s} s")

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def server(store: Store):
    """Started before the grid sweep (its start-up overlaps the sweep), stopped after use.

    The store is created first (here, under its lock) so the server finds it migrated.
    """
    tracking.prepare_store(store.uri)
    server = Server(store)
    yield server
    server.stop()


def test_same_sweep_again_evaluates_nothing_new(store: Store, grid, tmp_path) -> None:
    """Every setting already FINISHED: all skipped before the model is loaded (the cache of this
    new process counts no model load or hit), and the comparison still covers them. Each is
    still a child of the new parent: a copy of the finished run's results (metrics, per-case
    table), tagged with the run it came from."""
    result = sweep(store, "grid", "grid2", "data.split.method=all", "output.plots=false", *GRID)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("skipped: this setting already finished") == 4
    nothing = "cache: model 0 load(s), 0 hit(s); cases 0 load(s), 0 hit(s)"
    assert result.stdout.count(nothing) == 4, result.stdout[-3000:]
    client, parents, children = runs(store, "grid")
    assert len(parents) == 2 and len(children) == 8
    second = parents[1]
    assert second.info.status == "FINISHED"
    first_ids = {c.info.run_id for c in children[:4]}
    copies = [c for c in children if c.data.tags["mlflow.parentRunId"] == second.info.run_id]
    assert {c.info.run_name for c in copies} == GRID_NAMES
    sources = {c.info.run_id: c for c in children[:4]}
    for copy in copies:
        origin = copy.data.tags["evalharness.reused_from"]
        assert origin in first_ids and copy.info.status == "FINISHED"
        assert copy.data.metrics["dsc_mean"] == sources[origin].data.metrics["dsc_mean"]
        assert copy.info.run_name == sources[origin].info.run_name
        assert f"runs/{origin})" in copy.data.tags["mlflow.note.content"]
        assert copy.inputs.dataset_inputs  # the Dataset column
    table = artifact_table(client, second.info.run_id, "comparison.csv", tmp_path)
    assert set(table["status"]) == {"skipped"}
    assert set(table["run_id"]) == {c.info.run_id for c in copies}
    assert second.data.metrics["n_skipped_settings"] == 4
    assert second.data.tags["evalharness.best_setting"] in GRID_NAMES


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_mlflow_server_shows_children_under_the_parent(store: Store, grid, server) -> None:
    url = server.ready()
    _, parents, _ = runs(store, "grid")
    parent = parents[0]
    found = _post(
        f"{url}/api/2.0/mlflow/runs/search",
        {
            "experiment_ids": [parent.info.experiment_id],
            "filter": f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
        },
    )["runs"]
    assert len(found) == 4
    for run in found:
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert run["info"]["status"] == "FINISHED"
        assert params["patch.overlap"] in {"0.25", "0.5"}
        assert params["effective.aggregation"] in {"hann", "average"}
        assert {"dsc_mean", "hd95_mm_mean", "seconds_per_case", "cache.case_loads"} <= set(metrics)
    server.stop()  # not needed by the later tests


def test_failed_job_fails_the_parent_and_the_others_finish(store: Store, tmp_path) -> None:
    """A patch size the model cannot run fails one job; the other still runs and is compared.

    On the joblib launcher: two worker processes log to one SQLite store at once (no run
    lost, no "database is locked"), and the failure is recorded where the job ran.
    """
    result = sweep(
        store,
        "failing",
        "failing",
        "output.plots=false",
        "patch.size=[7,7,7],[16,16,16]",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "database is locked" not in result.stderr
    assert "sweep failed: 1 of 2 job(s) failed" in result.stderr
    client, parents, children = runs(store, "failing")
    parent = parents[0]
    assert parent.info.status == "FAILED"
    assert parent.data.params["sweep.launcher"].endswith("JoblibLauncher")
    assert parent.data.tags["evalharness.error"].startswith("1 of 2 job(s) failed: size=[7,7,7]: ")
    assert "patch.size=[7, 7, 7]" in parent.data.tags["evalharness.error"]
    statuses = {c.info.run_name: c.info.status for c in children}
    assert statuses == {"size=[16,16,16]": "FINISHED"}  # [7,7,7] could not start: no run
    worker_pids = {c.data.tags["evalharness.pid"] for c in children}
    assert parent.data.tags["evalharness.pid"] not in worker_pids
    table = artifact_table(client, parent.info.run_id, "comparison.csv", tmp_path)
    rows = table.set_index("setting")
    assert rows.loc["size=[7,7,7]", "status"] == "failed"
    assert pd.isna(rows.loc["size=[7,7,7]", "run_id"])
    assert rows.loc["size=[16,16,16]", "status"] == "finished"
    assert rows.loc["size=[16,16,16]", "dsc_mean"] >= 0
    assert parent.data.tags["evalharness.best_setting"] == "size=[16,16,16]"
    assert parent.data.metrics["n_settings"] == 2 and parent.data.metrics["n_failed_settings"] == 1


def test_sweep_over_the_restore_method_compares_each_method(store: Store, tmp_path) -> None:
    """`inference.restore` sweeps like any post-forward setting: one child per method, each
    logging `effective.restore` and its own configuration hash, one comparison row each.

    On two joblib workers the three settings are one group: the worker that claims it
    evaluates all three in one pass (one set of forward passes), the other waits for its
    job's outcome, and every job's folder gets its own outputs."""
    methods = ("probabilities", "labels", "bspline")
    result = sweep(
        store,
        "restore",
        "restore",
        "output.plots=false",
        f"inference.restore={','.join(methods)}",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    client, parents, children = runs(store, "restore")
    assert parents[0].info.status == "FINISHED"
    passes = sorted(c.data.metrics["forward_passes"] for c in children)
    assert passes[:2] == [0, 0] and passes[2] > 0
    assert sorted(c.data.metrics["forward_passes_reused"] for c in children) == [0, *passes[2:] * 2]
    pids = {c.data.tags["evalharness.pid"] for c in children}
    assert len(pids) == 1 and parents[0].data.tags["evalharness.pid"] not in pids
    folder = store.workdir / "sweeps" / "restore"
    assert all((folder / str(num) / "per_case.csv").is_file() for num in range(3))
    assert {c.data.params["effective.restore"]: c.info.status for c in children} == dict.fromkeys(
        methods, "FINISHED"
    )
    assert len({c.data.tags["evalharness.config_hash"] for c in children}) == 3
    table = artifact_table(client, parents[0].info.run_id, "comparison.csv", tmp_path)
    rows = table.set_index("inference.restore")
    assert set(rows.index) == set(methods) and set(rows["status"]) == {"finished"}
    assert set(rows["setting"]) == {f"restore={m}" for m in methods}
    assert rows["dsc_mean"].between(0, 1).all() and rows["hd95_mm_mean"].notna().all()
    assert rows["dsc_mean"].nunique() > 1  # the demo's grids are resampled: methods differ


def test_submitit_local_runs_jobs_in_other_processes(store: Store) -> None:
    result = sweep(
        store,
        "submitit",
        "submitit",
        "inference.aggregation=average",
        "output.plots=false",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=5",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _, parents, children = runs(store, "submitit")
    assert parents[0].info.status == "FINISHED"
    assert [c.info.status for c in children] == ["FINISHED"]
    assert children[0].info.run_name == "job0"  # nothing swept: named after the job number
    assert children[0].data.tags["evalharness.pid"] != parents[0].data.tags["evalharness.pid"]
    assert children[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id


def test_sigterm_mid_sweep_leaves_no_run_running(store: Store) -> None:
    """Stopped by a scheduler in the first job: parent and child are closed, not orphaned."""
    sweep_dir = store.workdir / "sweeps" / "stopped"
    process = subprocess.Popen(
        _command(
            store, "stopped", "stopped", "output.plots=false", "inference.aggregation=hann,crop"
        ),
        cwd=store.workdir,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not (sweep_dir / "0").is_dir() and process.poll() is None:
        assert time.monotonic() < deadline, "the first job never started"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGTERM)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 143, stderr[-3000:]  # 128 + SIGTERM, as the README says
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert "stopped by SIGTERM: any run in progress was closed as KILLED" in stderr
    _, parents, children = runs(store, "stopped")
    assert parents[0].info.status in ("KILLED", "FAILED")
    assert "RUNNING" not in {r.info.status for r in [*parents, *children]}


def test_job_that_raised_fails_the_parent_when_the_process_exits(store: Store, tmp_path) -> None:
    """Hydra skips `on_multirun_end` when a job raised: the exit guard closes the parent."""
    client = tracking.prepare_store(store.uri)
    experiment = tracking.experiment_id(client, store.uri, "raised")
    parent = tracking.create_run(client, experiment, "raised", {"evalharness.kind": "sweep"})
    callback = SweepCallback()
    callback.sweep_dir = tmp_path
    callback.state = SweepState(parent, store.uri, ("inference.aggregation",), "dsc_mean")
    config = OmegaConf.create(
        {"hydra": {"overrides": {"task": ["inference.aggregation=hann"]}, "job": {"num": 0}}}
    )
    job = JobReturn(status=JobStatus.FAILED, _return_value=RuntimeError("boom"))
    callback.on_job_end(config, job)
    callback._close_at_exit()  # what atexit runs
    run = client.get_run(parent)
    assert run.info.status == "FAILED"
    assert "aggregation=hann: raised: boom" in run.data.tags["evalharness.error"]
    table = pd.read_csv(tmp_path / "comparison.csv")
    assert list(table["status"]) == ["failed"]
    callback._close_at_exit()  # idempotent: a second exit hook changes nothing
    assert client.get_run(parent).info.end_time == run.info.end_time


def test_parent_of_a_killed_sweep_process_is_closed_by_the_next_sweep(store: Store) -> None:
    client = tracking.prepare_store(store.uri)
    experiment = tracking.experiment_id(client, store.uri, "orphans")
    gone = subprocess.Popen(["true"])
    gone.wait()
    tags = {"evalharness.kind": "sweep", "evalharness.host": socket.gethostname()}
    orphan = tracking.create_run(
        client, experiment, "killed", {**tags, "evalharness.pid": str(gone.pid)}
    )
    alive = tracking.create_run(client, experiment, "alive", {**tags, "evalharness.pid": "1"})
    close_orphaned_parents(client, experiment)
    assert client.get_run(orphan).info.status == "KILLED"
    assert client.get_run(alive).info.status == "RUNNING"  # another live process: left alone
    tracking.finish(client, alive, "FINISHED")


def test_setting_names_use_short_keys_unless_ambiguous() -> None:
    overrides = ["demo.size=tiny", "patch.overlap=0.5", "inference.aggregation=hann"]
    keys = ("patch.overlap", "inference.aggregation")
    assert setting_of(overrides, keys, 3) == (
        "aggregation=hann,overlap=0.5",
        {"patch.overlap": "0.5", "inference.aggregation": "hann"},
    )
    clash = ["patch.size=[8,8,8]", "data.size=2"]
    assert setting_of(clash, ("patch.size", "data.size"), 0)[0] == "data.size=2,patch.size=[8,8,8]"
    assert setting_of(overrides, (), 3)[0] == "job3"


def _long(dsc: list[float], rve: list[float]) -> pd.DataFrame:
    cases = [f"c{i}" for i in range(len(dsc))]
    return pd.DataFrame(
        {"case": cases, "label": 1, "status": "ok", "dsc": dsc, "rve": rve, "hd95_mm": dsc}
    )


def test_best_setting_follows_the_metric_direction() -> None:
    assert (direction("dsc_mean"), direction("hd95_mm_median"), direction("rve_mean")) == (
        "max",
        "min",
        "min_abs",
    )
    records = [
        JobRecord(0, "a", {}, "finished", 0, "ra"),
        JobRecord(1, "b", {}, "skipped", 0, "rb"),
        JobRecord(2, "c", {}, "failed", 1, "rc", "patch too small"),
    ]
    runs_data = {
        "ra": RunData(
            {"dsc_mean": 0.8, "rve_mean": -0.05}, {}, _long([0.7, 0.8, 0.9], [-0.1, 0, 0])
        ),
        "rb": RunData(
            {"dsc_mean": 0.7, "rve_mean": 0.2}, {}, _long([0.6, 0.7, 0.8], [0.2, 0.2, 0.2])
        ),
        "rc": RunData({}, {"evalharness.error": "patch too small"}),
    }
    by_dsc = compare(records, runs_data, "dsc_mean")
    assert by_dsc.stats["best"]["setting"] == "a"
    assert by_dsc.stats["n_failed"] == 1
    [test] = by_dsc.stats["tests"]
    assert test["setting"] == "b" and test["n_cases"] == 3
    assert math.isclose(test["median_difference"], 0.1)
    assert list(by_dsc.table["error"]) == ["", "", "patch too small"]
    by_rve = compare(records, runs_data, "rve_mean")
    assert by_rve.stats["best"]["setting"] == "a"  # |-0.05| < |0.2|
    assert by_rve.stats["test_metric"] == "|rve|"


def test_sharing_sweep_pays_each_patch_once_and_merges_shards(store: Store, tmp_path) -> None:
    """aggregation=hann,crop over two shards: crop re-blends hann's patch outputs (one set of
    forward passes for the group), each setting is one merged row over the 4 cases, the parent
    shows the totals, the merged per-case table and the accuracy-against-cost figure. Run again,
    every job is skipped and nothing is recomputed."""
    overrides = ("inference.aggregation=hann,crop", "data.shard=0/2,1/2", "data.split.method=all")
    result = sweep(store, "sharing", "sharing1", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    client, parents, children = runs(store, "sharing")
    assert len(children) == 4
    by_name = {c.info.run_name: c.data.metrics for c in children}
    hann = [by_name[f"aggregation=hann,shard={k}/2"] for k in range(2)]
    crop = [by_name[f"aggregation=crop,shard={k}/2"] for k in range(2)]
    patches = sum(m["forward_passes"] for m in hann)
    assert patches > 0 and all(m["forward_passes_reused"] == 0 for m in hann)
    assert [m["forward_passes"] for m in crop] == [0, 0]
    assert [m["forward_passes_reused"] for m in crop] == [m["forward_passes"] for m in hann]
    parent = parents[0]
    assert parent.data.metrics["forward_passes"] == patches
    assert parent.data.metrics["forward_passes_reused"] == patches
    table = artifact_table(client, parent.info.run_id, "comparison.csv", tmp_path)
    assert sorted(table["setting"]) == ["aggregation=crop", "aggregation=hann"]
    assert set(table["shards"]) == {"0/2,1/2"} and set(table["n_cases"]) == {N_CASES}
    merged = artifact_table(client, parent.info.run_id, "per_case_merged.csv", tmp_path)
    assert merged.groupby("setting")["case"].nunique().to_dict() == {
        "aggregation=crop": N_CASES,
        "aggregation=hann": N_CASES,
    }
    stats_path = client.download_artifacts(
        parent.info.run_id, "comparison_stats.json", str(tmp_path)
    )
    stats = json.loads(Path(stats_path).read_text())
    assert stats["pareto"] and {p["setting"] for p in stats["pareto"]} <= set(table["setting"])
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/cost_dsc_mean.png" in plots
    assert "Pareto-optimal by dsc_mean" in result.stdout
    again = sweep(store, "sharing", "sharing2", "output.plots=false", *overrides)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped: this setting already finished") == 4
    _, parents, children = runs(store, "sharing")
    assert len(children) == 8 and parents[1].data.metrics["forward_passes"] == 0
    assert all("evalharness.reused_from" in c.data.tags for c in children[4:])

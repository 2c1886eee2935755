"""What a user finds in the MLflow UI: a demo evaluation and a 2-setting sweep (one setting the
demo's own, reused) in one store, served by a real `mlflow server`. Through its REST API (the
calls its web app makes): every evaluation run names its cases as a dataset input (one digest
for the same cases), runs and the sweep's parent carry a summary page and a description, every
run has its gallery of the worst cases, every setting is a child of the parent. In headless
Chromium (Debian's `chromium`): the links the harness prints open the model-training runs table
with `dsc_mean` as a column, not MLflow's GenAI overview."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, sqlite_store
from html_pages import sources

from evalharness.demo.training_run import RUN_NAME as DEMO_RUN_NAME
from evalharness.track import ui_links

EXPERIMENT = "ui"
N_CASES = 4  # the tiny demo's cases with data.split.method=all
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Ui:
    url: str
    experiment_id: str
    runs: list[dict]  # every run of the experiment, as the server's JSON
    printed: dict[str, str]  # the links the harness printed (label -> link), on this server

    def evaluations(self) -> list[dict]:
        return [r for r in self.runs if tags(r).get("evalharness.kind") == "evaluation"]

    def children(self) -> list[dict]:
        parent = self.parent()["info"]["run_id"]
        return [r for r in self.runs if tags(r).get("mlflow.parentRunId") == parent]

    def parent(self) -> dict:
        (parent,) = [r for r in self.runs if tags(r).get("evalharness.kind") == "sweep"]
        return parent


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"]["metrics"]}


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def get_json(url: str, **query: str) -> dict:
    return json.loads(get(f"{url}?{urllib.parse.urlencode(query)}"))


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def artifact(ui: Ui, run: dict, path: str) -> bytes:
    """An artifact's bytes through the endpoint the UI's artifact view reads."""
    query = urllib.parse.urlencode({"path": path, "run_uuid": run["info"]["run_id"]})
    return get(f"{ui.url}/get-artifact?{query}")


def artifact_names(ui: Ui, run: dict, folder: str | None = None) -> list[str]:
    query = {"run_id": run["info"]["run_id"], **({"path": folder} if folder else {})}
    listed = get_json(f"{ui.url}/api/2.0/mlflow/artifacts/list", **query)
    return sorted(f["path"] for f in listed.get("files", []))


def links(stdout: str) -> dict[str, str]:
    """The ``  <label>: <link>`` lines the harness printed at the end of its runs."""
    found = re.findall(rf"^  ([a-z ]+): +({re.escape(ui_links.UI_DEFAULT_URL)}\S+)$", stdout, re.M)
    return dict(found)


def rendered_text(url: str) -> str:
    """The page at `url` as headless Chromium renders it (the app's scripts run), as text."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is needed (Debian: apt-get install chromium; .ci/run installs it)"
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000"]
    command += ["--virtual-time-budget=25000", "--dump-dom", url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    title = re.search(r"<title>(.*?)</title>", result.stdout, re.S)
    body = re.sub(r"<(style|script)\b.*?</\1>", " ", result.stdout, flags=re.S)
    text = html.unescape(re.sub(r"<[^>]+>", " ", body))
    return f"{title.group(1) if title else ''}\n{' '.join(text.split())}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _evaluate(workdir: Path, uri: str, demo_cache: Path, *args: str) -> str:
    command = [sys.executable, "-m", "evalharness", *args]
    command += [f"mlflow.tracking_uri={uri}", f"mlflow.experiment={EXPERIMENT}", "demo.size=tiny"]
    command += [f"demo.cache_dir={demo_cache}", "data.split.method=all"]
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true", "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def ui(
    tmp_path_factory: pytest.TempPathFactory, migrated_sqlite: Path, tiny_demo_cache: Path
) -> Iterator[Ui]:
    """The store with a demo evaluation (overlap 0.5, the training value) and a sweep over
    overlap 0.5 (the demo's run, reused) and 0.75, served by `mlflow server` on loopback
    (started first, so its start overlaps the evaluations; always stopped)."""
    workdir = tmp_path_factory.mktemp("ui")
    uri = sqlite_store(migrated_sqlite, workdir / "mlflow.db")  # migrated: the server opens it
    port = _free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log_path = workdir / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            command, cwd=workdir, stdout=log, stderr=log, start_new_session=True
        )
    try:
        single = _evaluate(workdir, uri, tiny_demo_cache, f"hydra.run.dir={workdir / 'single'}")
        sweep_dir = f"hydra.sweep.dir={workdir / 's'}"
        swept = _evaluate(workdir, uri, tiny_demo_cache, "-m", "patch.overlap=0.5,0.75", sweep_dir)
        url = f"http://127.0.0.1:{port}"
        printed = {
            k: v.replace(ui_links.UI_DEFAULT_URL, url) for k, v in links(single + swept).items()
        }
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, log_path.read_text()[-2000:]
            try:
                get(f"{url}/health")
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server not ready after 90 s"
                time.sleep(0.5)
        experiment = get_json(
            f"{url}/api/2.0/mlflow/experiments/get-by-name", experiment_name=EXPERIMENT
        )["experiment"]
        found = post_json(
            f"{url}/api/2.0/mlflow/runs/search",
            {"experiment_ids": [experiment["experiment_id"]], "max_results": 100},
        )["runs"]
        yield Ui(url, experiment["experiment_id"], found, printed)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_the_printed_links_open_the_runs_table_with_the_headline_metrics(ui: Ui) -> None:
    """MLflow 3.17 opens `#/experiments/<id>` on its GenAI overview whatever the experiment's
    tags; the links printed after a run and after a sweep open the model-training runs table,
    sorted by `dsc_mean` with it as a column, every setting of the sweep a row."""
    assert set(ui.printed) == {"run", "runs table", "parent run", "its settings", "compare them"}
    experiment = get_json(
        f"{ui.url}/api/2.0/mlflow/experiments/get-by-name", experiment_name=EXPERIMENT
    )["experiment"]
    tags = {t["key"]: t["value"] for t in experiment["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    settings = rendered_text(ui.printed["its settings"])
    assert settings.startswith("Runs - Experiment"), settings[:300]
    assert "Token Usage" not in settings and "Detect Issues" not in settings  # no GenAI overview
    assert "Model training" in settings and "Sort: dsc_mean" in settings
    header = settings[settings.index("Run Name") :]
    assert "dsc_mean" in header.split("overlap=")[0]  # a column of the table
    assert "overlap=0.5" in settings and "overlap=0.75" in settings  # the reused one too
    assert "2 matching runs" in settings  # the sweep's settings, not the demo's own run
    values = [repr(metrics(r)["dsc_mean"]) for r in ui.children()]
    assert len(values) == 2 and all(v in settings for v in values)  # in the dsc_mean column


def test_every_setting_of_the_sweep_is_a_child_of_its_parent(ui: Ui) -> None:
    """Overlap 0.5 had finished as the demo's own run: the parent gets a child recording it,
    with its metrics and a link to it; runs are named after model and setting."""
    (single,) = [r for r in ui.evaluations() if "mlflow.parentRunId" not in tags(r)]
    assert single["info"]["run_name"] == DEMO_RUN_NAME  # the model, no setting overridden
    children = {r["info"]["run_name"]: r for r in ui.children()}
    assert set(children) == {"overlap=0.5", "overlap=0.75"}
    reused = children["overlap=0.5"]
    origin = single["info"]["run_id"]
    assert tags(reused)["evalharness.reused_from"] == origin
    assert f"runs/{origin})" in tags(reused)["mlflow.note.content"]
    metrics = {m["key"]: m["value"] for m in reused["data"]["metrics"]}
    assert (
        metrics["dsc_mean"] == {m["key"]: m["value"] for m in single["data"]["metrics"]}["dsc_mean"]
    )
    assert "evalharness.reused_from" not in tags(children["overlap=0.75"])
    assert "per_case.csv" in artifact_names(ui, reused)


def test_every_evaluation_names_its_cases_with_one_digest(ui: Ui) -> None:
    evaluations = ui.evaluations()
    assert len(evaluations) == 3 and all(r["info"]["status"] == "FINISHED" for r in ui.runs)
    inputs = [r["inputs"]["dataset_inputs"] for r in evaluations]
    assert [len(i) for i in inputs] == [1, 1, 1]
    datasets = [i[0]["dataset"] for i in inputs]
    assert {d["name"] for d in datasets} == {"demo/all"}
    assert len({d["digest"] for d in datasets}) == 1  # same cases, whatever the setting
    assert json.loads(datasets[0]["profile"])["num_rows"] == N_CASES
    contexts = {(t["key"], t["value"]) for i in inputs for t in i[0]["tags"]}
    assert contexts == {("mlflow.data.context", "evaluation")}
    assert not ui.parent().get("inputs", {}).get("dataset_inputs")


def test_runs_have_a_note_a_summary_page_and_the_gallery(ui: Ui) -> None:
    for run in ui.evaluations():
        per_case = pd.read_csv(StringIO(artifact(ui, run, "per_case.csv").decode()))
        scores = per_case.groupby("case")["dsc"].mean().sort_values(kind="stable")
        worst_case = scores.index[0]
        lines = tags(run)["mlflow.note.content"].splitlines()
        if "evalharness.reused_from" in tags(run):  # a copy: first, where it comes from
            assert lines.pop(0).startswith("- Reused from run [")
        assert len(lines) == 3
        assert lines[0].startswith("- **Mean DSC ") and f"over {N_CASES} cases" in lines[0]
        assert lines[1] == f"- Worst case: {worst_case} (DSC {scores.iloc[0]:.3f})"
        assert lines[2].startswith("- Preprocessing mismatches: ")

        gallery = artifact_names(ui, run, "plots/gallery")
        expected = [
            f"plots/gallery/label1_worst{k + 1}_{c}.png" for k, c in enumerate(scores.index[:3])
        ]
        assert gallery == expected  # the 3 worst of label 1, worst first
        assert artifact(ui, run, gallery[0])[:8] == PNG_SIGNATURE

        assert "summary.html" in artifact_names(ui, run)
        page = artifact(ui, run, "summary.html").decode()
        assert "<h1>Evaluation on demo/all</h1>" in page and worst_case in page
        urls = sources(page)
        assert urls.scripts == 0 and urls.urls
        assert all(u.startswith("data:image/png;base64,") for u in urls.urls)  # nothing fetched
        assert len(urls.urls) == len(artifact_names(ui, run, "plots")) - 1 + len(gallery)


def test_the_parent_has_a_summary_page_with_the_best_setting(ui: Ui) -> None:
    parent = ui.parent()
    best = tags(parent)["evalharness.best_setting"]
    assert best in {"overlap=0.5", "overlap=0.75"}
    assert tags(parent)["mlflow.note.content"].startswith(f"- **Best: {best}**")
    page = artifact(ui, parent, "summary.html").decode()
    assert f'<tr class="best"><td>{best}</td>' in page
    urls = sources(page)
    assert urls.scripts == 0 and all(u.startswith("data:image/png;base64,") for u in urls.urls)
    assert len(urls.urls) == len(artifact_names(ui, parent, "plots"))


def test_headline_metrics_come_first(ui: Ui) -> None:
    """The compare view's parallel-coordinates plot opens on the first metric the server lists."""
    for run in ui.evaluations():
        got = get_json(f"{ui.url}/api/2.0/mlflow/runs/get", run_id=run["info"]["run_id"])
        keys = [m["key"] for m in got["run"]["data"]["metrics"]]
        assert keys[:5] == ["dsc_mean", "hd95_mm_mean", "sens_mean", "ldr_mean", "rve_mean"]
        assert "headline/dsc_mean" in keys

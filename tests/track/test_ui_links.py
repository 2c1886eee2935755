"""The links the harness prints and the shared views they name (what MLflow 3.17's web app
reads from them is checked in a real browser by `tests/test_mlflow_ui.py`)."""

from __future__ import annotations

import json
import urllib.parse

from evalharness.track import tracking, ui_links


def test_the_views_sort_by_the_primary_metric_best_first_with_its_columns() -> None:
    view = ui_links.view_state()
    assert view["orderByKey"] == "metrics.`dsc_mean`" and view["orderByAsc"] is False
    assert view["selectedColumns"][:2] == ["metrics.`dsc_mean`", "metrics.`hd95_mm_mean`"]
    assert "metrics.`seconds_per_case`" in view["selectedColumns"]
    assert view["searchFilter"] == "" and view["runsHiddenMode"] == "SHOW_ALL"
    distance = ui_links.view_state("hd95_mm_mean")
    assert distance["orderByAsc"] is True  # lower is better
    assert distance["selectedColumns"][0] == "metrics.`hd95_mm_mean`"
    ((key, value),) = ui_links.sweep_view_tags("abc", "dsc_mean").items()
    assert key == "mlflow.sharedViewState.evalharness-sweep-abc"
    assert json.loads(value)["searchFilter"] == "tags.mlflow.parentRunId = 'abc'"


def test_links_open_the_model_training_view() -> None:
    base = ui_links.ui_base("sqlite:////tmp/mlflow.db")
    assert base == "http://127.0.0.1:5000"
    assert ui_links.ui_base("https://mlflow.example.org/") == "https://mlflow.example.org"
    table = ui_links.runs_table_link(base, "3")
    assert table == (
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
        "&viewStateShareKey=evalharness"
    )
    assert ui_links.run_link(base, "3", "r1").endswith("/runs/r1?workflowType=machine_learning")
    compare = ui_links.compare_link(base, "3", ["r1", "r2"])
    query = urllib.parse.parse_qs(compare.split("?", 1)[1])
    assert json.loads(query["runs"][0]) == ["r1", "r2"]
    assert json.loads(query["experiments"][0]) == ["3"]


def test_closing_lines_say_how_to_open_the_ui() -> None:
    links = [("run", "L1"), ("runs table", "L2")]
    local = ui_links.where_lines("sqlite:////s/mlflow.db", "/out/run", "summary.html", links)
    assert local == [
        "Results: /out/run (summary.html)",
        "MLflow UI: mlflow ui --backend-store-uri 'sqlite:////s/mlflow.db', then open",
        "  run:        L1",
        "  runs table: L2",
    ]
    served = ui_links.where_lines("http://host:5000", "/out/run", "summary.html", links)
    assert served[1] == "MLflow UI:"


def test_experiments_get_the_harness_view_and_keep_it_current(sqlite_uri) -> None:
    client = tracking.prepare_store(sqlite_uri)
    created = tracking.experiment_id(client, sqlite_uri, "new")
    key = ui_links.SHARED_VIEW_TAG + ui_links.EXPERIMENT_VIEW
    assert json.loads(client.get_experiment(created).tags[key]) == ui_links.view_state()
    client.set_experiment_tag(created, key, "{}")  # an older view of the harness
    tracking.experiment_id(client, sqlite_uri, "new")
    assert json.loads(client.get_experiment(created).tags[key]) == ui_links.view_state()

"""Links into the MLflow UI that open where a person looks: the model-training runs table, the
headline metrics as columns, sorted by the primary metric, every setting of a sweep a row.

What decides it in MLflow 3.17's web app (`mlflow/server/js/src`, checked in its built bundle
and in headless Chromium against `mlflow server` 3.17.2):

- GenAI or model training: ``common/contexts/WorkflowTypeContext.tsx`` takes the URL parameter
  ``workflowType`` (``genai`` | ``machine_learning``), else the browser's localStorage
  ``mlflow.workflowType``, else ``genai``. ``experiment-tracking/utils/ExperimentKindUtils.ts``
  (`useExperimentKind`) derives the experiment's kind, and so its landing tab (GenAI
  "Overview" or "Runs"), from that workflow type whenever workflow-based navigation is on
  (`shouldEnableWorkflowBasedNavigation`, always true in the open-source build); the
  experiment tag ``mlflow.experimentKind`` counts only when it is off. No stored default
  exists on the server: the link carries ``workflowType=machine_learning``.
- Columns, sort and filter of the runs table live in the browser; a link's
  ``viewStateShareKey=<key>`` loads the "shared view" stored as the experiment tag
  ``mlflow.sharedViewState.<key>`` (JSON: the search facets ``searchFilter``, ``orderByKey``,
  ``orderByAsc``, ... and the UI state ``selectedColumns``, ``runsHiddenMode``, ...). Search
  facets in the URL itself switch the shared view off. Sorting by a metric lists parents and
  children flat, so a sweep's settings are all rows, none collapsed.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Sequence

UI_DEFAULT_URL = "http://127.0.0.1:5000"
"""Where ``mlflow ui`` / ``mlflow server`` serve a local store by default."""
WORKFLOW_QUERY = "workflowType=machine_learning"
SHARED_VIEW_TAG = "mlflow.sharedViewState."
EXPERIMENT_VIEW = "evalharness"
"""Share key of the experiment's view: every run, sorted by ``dsc_mean``."""
HEADLINE_COLUMNS = ("dsc_mean", "hd95_mm_mean", "sens_mean", "ldr_mean", "rve_mean")
LOWER_IS_BETTER = ("hd95", "assd", "seconds")


def served(tracking_uri: str) -> bool:
    """The store is a tracking server (its address is the UI's); else a local store."""
    return urllib.parse.urlparse(tracking_uri).scheme in ("http", "https")


def ui_base(tracking_uri: str) -> str:
    """The UI's address: the tracking server's, else where ``mlflow ui`` serves a local store."""
    return tracking_uri.rstrip("/") if served(tracking_uri) else UI_DEFAULT_URL


def column(kind: str, name: str) -> str:
    """The UI's column key: ``metrics.`dsc_mean```, ``attributes.`Dataset```."""
    return f"{kind}.`{name}`"


def view_state(primary_metric: str = "dsc_mean", search_filter: str = "") -> dict:
    """A shared view: `primary_metric` first and sorted by (best first), the headline means,
    its interval and the cost as columns (the run name and the metrics need the width more
    than the dataset), every run shown in the charts."""
    metrics = [
        primary_metric,
        *(m for m in HEADLINE_COLUMNS if m != primary_metric),
        f"{primary_metric}_ci95_low",
        f"{primary_metric}_ci95_high",
        "seconds_per_case",
    ]
    return {
        "searchFilter": search_filter,
        "orderByKey": column("metrics", primary_metric),
        "orderByAsc": any(primary_metric.startswith(p) for p in LOWER_IS_BETTER),
        "selectedColumns": [column("metrics", m) for m in metrics],
        "runsHiddenMode": "SHOW_ALL",
    }


def experiment_view_tags() -> dict[str, str]:
    """Experiment tags of the experiment's view (`EXPERIMENT_VIEW`)."""
    return {SHARED_VIEW_TAG + EXPERIMENT_VIEW: json.dumps(view_state())}


def sweep_view_key(parent_run_id: str) -> str:
    return f"evalharness-sweep-{parent_run_id}"


def sweep_view_tags(parent_run_id: str, primary_metric: str) -> dict[str, str]:
    """Experiment tags of a sweep's view: its children (every setting), best first."""
    children = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    state = view_state(primary_metric, children)
    return {SHARED_VIEW_TAG + sweep_view_key(parent_run_id): json.dumps(state)}


def runs_table_link(base: str, experiment_id: str, view_key: str = EXPERIMENT_VIEW) -> str:
    """The runs table of the model-training view, with the shared view `view_key`."""
    query = f"{WORKFLOW_QUERY}&viewStateShareKey={view_key}"
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def run_link(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW_QUERY}"


def compare_link(base: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    """The compare view of `run_ids` (params, metrics, parallel coordinates)."""
    runs = urllib.parse.quote(json.dumps(list(run_ids), separators=(",", ":")))
    experiments = urllib.parse.quote(json.dumps([experiment_id]))
    return f"{base}/#/compare-runs?runs={runs}&experiments={experiments}&{WORKFLOW_QUERY}"


def where_lines(
    tracking_uri: str, folder: str, contents: str, links: Sequence[tuple[str, str]]
) -> list[str]:
    """The closing lines of a run or sweep: its folder and what is there, how to open the UI
    on the store, then the (label, link) `links`."""
    lines = [f"Results: {folder} ({contents})"]
    if served(tracking_uri):
        lines.append("MLflow UI:")
    else:
        lines.append(f"MLflow UI: mlflow ui --backend-store-uri '{tracking_uri}', then open")
    width = max((len(label) for label, _ in links), default=0)
    lines += [f"  {label + ':':<{width + 1}} {link}" for label, link in links]
    return lines

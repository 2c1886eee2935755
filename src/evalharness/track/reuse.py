"""A sweep's setting that already finished as a run outside the sweep, recorded as a child.

Resume skips a setting whose configuration hash already FINISHED. When that run is not a
child of this sweep's parent (the demo's own run, an earlier sweep), the parent still gets a
child for the setting: a FINISHED run with the finished run's parameters, metrics, tags,
dataset input and artifacts (``summary.html``, ``per_case.csv``, ``plots/``, ...; not its saved
predictions), tagged ``evalharness.reused_from`` with a link to it in its description. The
runs table, the compare view and the charts then show every setting of the sweep; nothing is
evaluated twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Run

from evalharness.track import tracking
from evalharness.track.liveness import HOST_TAG, PID_TAG
from evalharness.track.summaries import NOTE_TAG, headline_first

REUSED_FROM_TAG = "evalharness.reused_from"
NOT_COPIED = ("predictions",)
"""Artifacts of the finished run left there (the link leads to them): saved predictions."""


def reused_from(run: Run) -> str:
    """The run that computed `run`'s results: itself, or the one it was copied from."""
    return run.data.tags.get(REUSED_FROM_TAG) or run.info.run_id


def finished_setting(
    client: Any,
    finished: Sequence[Run],
    experiment_id: str,
    name: str | None,
    tags: Mapping[str, str],
    scratch: Path,
) -> str:
    """The run a sweep's finished setting points to (`finished`: its FINISHED runs, newest
    first; `tags`: of the run it would have created, with its parent): one that is already a
    child of this parent, or a new child recording the newest (`record_reused`)."""
    parent = tags.get("mlflow.parentRunId")
    ours = [r for r in finished if r.data.tags.get("mlflow.parentRunId") == parent]
    source = (ours or finished)[0]
    print(
        f"skipped: this setting already finished as run {reused_from(source)} "
        "(sweep.resume=false re-runs)"
    )
    if ours or parent is None:
        return source.info.run_id
    child = record_reused(client, source, experiment_id, name, tags, scratch)
    print(f"reused: its results recorded as run {child}, a child of the sweep's parent")
    return child


def record_reused(
    client: Any,
    source: Run,
    experiment_id: str,
    name: str | None,
    tags: Mapping[str, str],
    scratch: Path,
) -> str:
    """A FINISHED run (with `tags`: its parent, liveness) recording finished run `source`'s
    results as a setting of the sweep; returns its id."""
    origin = reused_from(source)
    copied = {
        k: v
        for k, v in source.data.tags.items()
        if not k.startswith("mlflow.") and k not in (PID_TAG, HOST_TAG)
    }
    shown = f"{source.info.run_name} ({origin[:8]})" if source.info.run_name else origin
    link = f"[{shown}](#/experiments/{experiment_id}/runs/{origin})"
    note = source.data.tags.get(NOTE_TAG, "")
    description = f"- Reused from run {link}: this setting had already finished there\n{note}"
    run_id = tracking.create_run(client, experiment_id, name, {**tags, **copied})
    tracking.set_tags(client, run_id, {REUSED_FROM_TAG: origin, NOTE_TAG: description.strip()})
    tracking.log_params(client, run_id, source.data.params)
    tracking.log_metrics(client, run_id, headline_first(source.data.metrics))
    inputs = list(source.inputs.dataset_inputs) if source.inputs else []
    if inputs:  # the Dataset column: the same cases
        tracking.retry_locked(lambda: client.log_inputs(run_id, datasets=inputs))
    for artifact in client.list_artifacts(source.info.run_id):
        if artifact.path in NOT_COPIED:
            continue
        target = scratch / source.info.run_id
        target.mkdir(parents=True, exist_ok=True)
        local = Path(client.download_artifacts(source.info.run_id, artifact.path, str(target)))
        if artifact.is_dir:
            tracking.retry_locked(lambda p=local: client.log_artifacts(run_id, str(p), p.name))
        else:
            tracking.log_file(client, run_id, local)
    tracking.finish(client, run_id, "FINISHED")
    return run_id

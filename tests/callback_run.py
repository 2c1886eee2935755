"""Re-log the recorded fastMONAI 0.12 callback run into a store (for tests).

``tests/fixtures/fastmonai-0.12-callback-run/`` holds what fastMONAI's own MLflow callback logged
(artifacts, params, tags, run and experiment name: see its README). `log_callback_run` writes a
run with the same experiment and run name, params, tags and artifact paths, so tests evaluate
"a run fastMONAI made" by its id without fastMONAI.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Param, RunTag

CALLBACK_RUN = Path(__file__).resolve().parent / "fixtures" / "fastmonai-0.12-callback-run"
ARTIFACTS = CALLBACK_RUN / "artifacts"
PEER_METRICS = CALLBACK_RUN / "peer_reference" / "metrics_native_space.csv"


def recorded_run() -> dict:
    """run.json: experiment, run_name, params, tags, metrics of the recorded run."""
    return json.loads((CALLBACK_RUN / "run.json").read_text())


def recorded_artifacts() -> list[str]:
    """The recorded run's artifact paths (run-relative, '/'-separated), sorted."""
    return sorted(p.relative_to(ARTIFACTS).as_posix() for p in ARTIFACTS.rglob("*") if p.is_file())


def log_callback_run(
    uri: str,
    *,
    artifacts: Iterable[str] | None = None,
    experiment: str | None = None,
) -> str:
    """Log the recorded callback run into the store at `uri`; returns the new run's id.

    `artifacts` keeps only those artifact paths (default: all, as recorded); `experiment`
    overrides the recorded experiment name (it is created when missing).
    """
    recorded = recorded_run()
    client = MlflowClient(tracking_uri=uri)
    name = experiment or recorded["experiment"]
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    run_id = client.create_run(experiment_id, run_name=recorded["run_name"]).info.run_id
    params = [Param(k, v) for k, v in recorded["params"].items()]
    tags = [RunTag(k, v) for k, v in recorded["tags"].items() if k != "mlflow.runName"]
    client.log_batch(run_id, params=params, tags=tags)
    for key, value in recorded["metrics"].items():
        client.log_metric(run_id, key, value)
    keep = set(recorded_artifacts() if artifacts is None else artifacts)
    for path in sorted(keep):
        folder = str(Path(path).parent.as_posix())
        client.log_artifact(run_id, str(ARTIFACTS / path), None if folder == "." else folder)
    client.set_terminated(run_id, recorded["status"])
    return run_id

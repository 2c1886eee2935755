"""The one policy of every MLflow client the harness opens, on the evaluation store (`track`)
and on a training store (`model.sources`): a bounded wait on an unreachable server, no
download progress bars, local file stores allowed. Below both, so neither imports the other."""

from __future__ import annotations

import os
from urllib.parse import urlparse

from mlflow.tracking import MlflowClient

HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
"""The one HTTP policy for every tracking server the harness talks to (evaluation and
training stores): a bounded wait on an unreachable server. A value the user exported wins."""


def client_for(tracking_uri: str, registry_uri: str | None = None) -> MlflowClient:
    """An `MlflowClient` for `tracking_uri` under the harness's process-wide MLflow defaults:
    `HTTP_DEFAULTS`, no download progress bars (ours is per case), file stores allowed."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if urlparse(tracking_uri).scheme in ("file", ""):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)

"""The one policy of every MLflow client the harness opens, on the evaluation store (`track`)
and on a training store (`model.sources`): a bounded wait on an unreachable server, no
download progress bars, local file stores allowed, and a local store created under a file lock
(two processes creating one SQLite store collide). Below both, so neither imports the other."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

from filelock import FileLock
from mlflow.tracking import MlflowClient

from evalharness.errors import ConfigError

HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
"""The one HTTP policy for every tracking server the harness talks to (evaluation and
training stores): a bounded wait on an unreachable server. A value the user exported wins."""


KNOWN_SCHEMES = frozenset(
    {"", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks"}
    | {"databricks-uc", "uc"}
)
"""Tracking URI schemes MLflow serves (a SQLAlchemy ``dialect+driver`` counts as its dialect),
besides the schemes of installed store plugins."""


def check_scheme(tracking_uri: str) -> None:
    """`ConfigError` for a scheme no MLflow store serves (``sqlit:///...``): MLflow's own
    message would be about its model registry."""
    scheme = urlparse(tracking_uri).scheme.split("+")[0]
    if scheme in KNOWN_SCHEMES or (len(scheme) == 1 and os.name == "nt"):  # C:\ paths
        return
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        plugins = set(_tracking_store_registry._registry)
    except (ImportError, AttributeError):
        plugins = set()
    if scheme not in plugins:
        expected = "sqlite:///<file>, file:<folder>, http(s)://<server>, a database URL or a path"
        raise ConfigError(
            f"{tracking_uri}: unknown tracking URI scheme {scheme!r} (expected {expected})"
        )


def client_for(tracking_uri: str, registry_uri: str | None = None) -> MlflowClient:
    """An `MlflowClient` for `tracking_uri` under the harness's process-wide MLflow defaults:
    `HTTP_DEFAULTS`, no download progress bars (ours is per case), file stores allowed."""
    check_scheme(tracking_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if urlparse(tracking_uri).scheme in ("file", ""):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # MLflow logs every database error with its traceback; `track.tracking.store_write` reports
    # each on one line (hydra.verbose=true shows the traceback).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    with store_lock(tracking_uri):  # a SQLite client creates and migrates its store right here
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)


def local_store_path(tracking_uri: str) -> Path | None:
    """The SQLite file or file-store folder behind `tracking_uri`; None for other stores."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite" and tracking_uri.startswith("sqlite:///"):
        path = unquote(tracking_uri[len("sqlite:///") :].split("?", 1)[0])
    elif parsed.scheme == "file":
        path = unquote(parsed.path)
    elif parsed.scheme == "" and tracking_uri:
        path = tracking_uri
    else:
        return None
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Serialise first use of a local store across processes (SQLite migrations collide)."""
    path = local_store_path(tracking_uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.with_name(path.name + ".lock")), timeout=300):
        yield

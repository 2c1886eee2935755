"""Everything MLflow: the store, runs, params, metrics, tables, artifacts and final status.

All calls go through an explicit `MlflowClient` and run id (no fluent active-run state), so an
exported ``MLFLOW_RUN_ID`` or a run left active elsewhere cannot redirect what is logged.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pandas as pd
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.tracking import MlflowClient

from evalharness.errors import ConfigError, HarnessError, StoreError, first_line
from evalharness.mlflow_client import client_for, local_store_path, store_lock
from evalharness.track import ui_links

MAX_PARAM_CHARS = 6000
BATCH = 100
LOCKED_RETRIES = 8  # SQLite "database is locked" under concurrent writers: retry with backoff
LOCKED_BACKOFF_S = 0.2  # first wait; doubles each attempt (25 s in all at most)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""The experiment's kind for MLflow clients that read it; MLflow 3.17's UI itself follows the
GenAI | Model training switch instead (see `ui_links`)."""
T = TypeVar("T")


def default_tracking_uri(cwd: Path) -> str:
    """``sqlite:///<cwd>/outputs/mlflow.db`` as an absolute URI."""
    return f"sqlite:///{(cwd / 'outputs' / 'mlflow.db').resolve()}"


def absolute_tracking_uri(tracking_uri: str) -> str:
    """`tracking_uri` with a local store's relative path made absolute (others unchanged).

    ``sqlite:///mlflow.db`` -> ``sqlite:////cwd/mlflow.db``; ``mlruns`` or ``file:mlruns``
    -> ``file:///cwd/mlruns``.
    """
    path = local_store_path(tracking_uri)
    if path is None or path.is_absolute():
        return tracking_uri
    if urlparse(tracking_uri).scheme == "sqlite":
        query = tracking_uri.partition("?")[2]
        return f"sqlite:///{path.absolute()}" + (f"?{query}" if query else "")
    return path.absolute().as_uri()


def artifact_location(tracking_uri: str) -> str | None:
    """``mlartifacts/`` next to a SQLite database (MLflow's default would be ./mlruns of
    whatever folder the process runs in); None (MLflow's default) for other stores."""
    path = local_store_path(tracking_uri)
    if urlparse(tracking_uri).scheme != "sqlite" or path is None:
        return None
    return (path.absolute().parent / "mlartifacts").as_uri()


def prepare_store(tracking_uri: str) -> MlflowClient:
    """A client for `tracking_uri`, with the store created (under a lock)."""
    client = client_for(tracking_uri)
    with store_lock(tracking_uri):
        client.search_experiments(max_results=1)
    return client


def experiment_id(client: MlflowClient, tracking_uri: str, name: str) -> str:
    """Id of experiment `name`, created if missing (race-safe across processes).

    An experiment without a kind gets `EXPERIMENT_KIND` (a kind someone set is left alone),
    and the harness's shared runs-table view (`ui_links`), which the links it prints open.
    """
    wanted = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, **ui_links.experiment_view_tags()}
    with store_lock(tracking_uri):
        experiment = client.get_experiment_by_name(name)
        if experiment is not None and experiment.lifecycle_stage == "deleted":
            raise ConfigError(
                f"mlflow.experiment={name}: the experiment is deleted in {tracking_uri} (restore "
                f"it: mlflow experiments restore --experiment-id {experiment.experiment_id}, "
                "or choose another mlflow.experiment)"
            )
        if experiment is None:
            return client.create_experiment(
                name, artifact_location=artifact_location(tracking_uri), tags=wanted
            )
        have = experiment.tags
        for key, value in wanted.items():
            if key not in have or (key != EXPERIMENT_KIND_TAG and have[key] != value):
                set_experiment_tag(client, experiment.experiment_id, key, value)
        return experiment.experiment_id


def set_experiment_tag(client: MlflowClient, experiment_id: str, key: str, value: str) -> None:
    retry_locked(lambda: client.set_experiment_tag(experiment_id, key, value))


def open_experiment(tracking_uri: str, name: str) -> tuple[MlflowClient, str]:
    """The one way into the evaluation store: a client and the id of experiment `name`."""
    client = prepare_store(tracking_uri)
    return client, experiment_id(client, tracking_uri, name)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts to dotted keys; lists and scalars stay values."""
    if not isinstance(value, Mapping):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _param_text(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


def retry_locked(write: Callable[[], T]) -> T:
    """Run `write`, retrying with exponential backoff while SQLite reports a locked database.

    MLflow waits 20 s for a lock itself, but SQLite answers a writer that started as a reader
    with an immediate "database is locked"; parallel sweep jobs then collide. A failed write is
    rolled back, so repeating it is safe.
    """
    attempt = 0
    while True:
        try:
            return write()
        except Exception as error:
            attempt += 1
            if "database is locked" not in str(error) or attempt >= LOCKED_RETRIES:
                raise
            time.sleep(LOCKED_BACKOFF_S * 2 ** (attempt - 1))


WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EIO}
)
"""A write refused by the file system: the user's to fix (space, permissions), not a bug."""


def write_failure(error: BaseException) -> str | None:
    """Why a write failed, in a few words (``No space left on device``, ``database or disk is
    full``, ``file is not a database``), or None when `error` is no failed write or SQLite
    error."""
    for link in (error, error.__cause__, error.__context__):
        if isinstance(link, OSError) and link.errno in WRITE_ERRNOS:
            return os.strerror(link.errno)
    sqlite = re.search(r"\(sqlite3\.\w+\) ([^\[\n]+)", str(error))
    return sqlite.group(1).strip() if sqlite else None


def _written_path(error: BaseException) -> str | None:
    for link in (error, error.__cause__, error.__context__):
        if isinstance(link, OSError) and link.filename:
            return str(link.filename)
    return None


def _where(client: MlflowClient, error: BaseException, args: tuple) -> str:
    """The file a failed write names, else the run's artifact folder (a file-system error
    while logging an artifact), else the store."""
    path = _written_path(error)
    if path:
        return f"artifact {path}"
    file_system = any(isinstance(e, OSError) for e in (error, error.__cause__, error.__context__))
    if file_system and args and isinstance(args[0], str):
        with contextlib.suppress(Exception):  # a read may still work on a full disk
            return f"artifacts {client.get_run(args[0]).info.artifact_uri}"
    return f"mlflow.tracking_uri={client.tracking_uri}"


def store_write(function: Callable[..., T]) -> Callable[..., T]:
    """Decorator of a write to the store (first argument: the client, then the run id): its
    failure becomes a one-line `StoreError` naming the store, or the artifact file or folder,
    and the cause."""

    @functools.wraps(function)
    def write(client: MlflowClient, *args: Any, **kwargs: Any) -> T:
        try:
            return function(client, *args, **kwargs)
        except HarnessError:
            raise
        except Exception as error:
            cause = write_failure(error) or first_line(error)
            where = _where(client, error, args)
            raise StoreError(f"{where}: cannot write to the store ({cause})") from error

    return write


@store_write
def create_run(
    client: MlflowClient, experiment_id: str, name: str | None, tags: Mapping[str, str]
) -> str:
    """A new RUNNING run; returns its id."""
    run = retry_locked(lambda: client.create_run(experiment_id, run_name=name, tags=dict(tags)))
    return run.info.run_id


@store_write
def _log_batch(client: MlflowClient, run_id: str, **items: list) -> None:
    retry_locked(lambda: client.log_batch(run_id, **items))


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(k, _param_text(v)) for k, v in sorted(params.items())]
    for start in range(0, len(items), BATCH):
        _log_batch(client, run_id, params=items[start : start + BATCH])


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    items = [RunTag(k, _param_text(v)) for k, v in tags.items()]
    for start in range(0, len(items), BATCH):
        _log_batch(client, run_id, tags=items[start : start + BATCH])


def log_metrics(
    client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0
) -> None:
    """Log the finite values (MLflow cannot compare NaN or inf across runs)."""
    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if v is not None and math.isfinite(float(v))
    ]
    for start in range(0, len(items), BATCH):
        _log_batch(client, run_id, metrics=items[start : start + BATCH])


@store_write
def log_file(
    client: MlflowClient, run_id: str, path: Path, artifact_dir: str | None = None
) -> None:
    client.log_artifact(run_id, str(path), artifact_dir)


@store_write
def log_folder(
    client: MlflowClient, run_id: str, folder: Path, paths: Sequence[Path], artifact_dir: str
) -> None:
    """Log `paths`, files under `folder`, to `artifact_dir` at their place under `folder`
    (``folder/gallery/a.png`` -> ``<artifact_dir>/gallery/a.png``): one `log_artifacts` call
    when they are every file there, else one `log_artifact` call each (stale files left in
    `folder` by an earlier run are not logged)."""
    root = Path(folder).resolve()
    wanted = {Path(p).resolve() for p in paths}
    present = {p.resolve() for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()
    if wanted and wanted == present:
        client.log_artifacts(run_id, str(root), artifact_dir)
        return
    for path in paths:
        parent = Path(path).resolve().relative_to(root).parent.as_posix()
        log_file(
            client, run_id, path, artifact_dir if parent == "." else f"{artifact_dir}/{parent}"
        )


@store_write
def log_text(client: MlflowClient, run_id: str, text: str, artifact_file: str) -> None:
    client.log_text(run_id, text, artifact_file)


@store_write
def log_table(client: MlflowClient, run_id: str, table: pd.DataFrame, artifact_file: str) -> None:
    """Log `table` through MLflow's table API (shown in the UI's artifact and evaluation views).

    MLflow appends to an existing table file, so call this once per run and file.
    """
    client.log_table(run_id, data=table, artifact_file=artifact_file)


@store_write
def finish(client: MlflowClient, run_id: str, status: str, error: str | None = None) -> None:
    """End the run with `status` (FINISHED, FAILED, KILLED), recording `error` as a tag."""
    if error is not None:
        set_tags(client, run_id, {"evalharness.error": error})
    retry_locked(lambda: client.set_terminated(run_id, status=status))


def runs_with_tag(client: MlflowClient, experiment_id: str, key: str, value: str) -> list[Run]:
    """Runs of the experiment carrying tag `key` = `value`, newest first."""
    return list(
        client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{key}` = '{value}'",
            order_by=["attributes.start_time DESC"],
            max_results=1000,
        )
    )


def download_csv(
    client: MlflowClient, run_id: str, artifact: str, scratch: Path
) -> pd.DataFrame | None:
    """An artifact CSV of the run as a table, or None when the run has none."""
    local = _download(client, run_id, artifact, scratch)
    return None if local is None else pd.read_csv(local, keep_default_na=True)


def download_json(client: MlflowClient, run_id: str, artifact: str, scratch: Path) -> Any:
    """An artifact JSON of the run, or None when the run has none."""
    local = _download(client, run_id, artifact, scratch)
    return None if local is None else json.loads(Path(local).read_text())


def _download(client: MlflowClient, run_id: str, artifact: str, scratch: Path) -> str | None:
    folder = str(Path(artifact).parent)
    names = {a.path for a in client.list_artifacts(run_id, None if folder == "." else folder)}
    if artifact not in names:
        return None
    target = scratch / "previous" / run_id
    target.mkdir(parents=True, exist_ok=True)
    return client.download_artifacts(run_id, artifact, str(target))


def download_folder(client: MlflowClient, run_id: str, folder: str, scratch: Path) -> Path | None:
    """The run's artifact folder `folder` (its files), downloaded afresh under `scratch`; None
    when the run has no file there."""
    if not any(not a.is_dir for a in client.list_artifacts(run_id, folder)):
        return None
    target = scratch / run_id
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    return Path(client.download_artifacts(run_id, folder, str(target)))

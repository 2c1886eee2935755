"""An evaluation run's life: created on first need, closed whatever happens.

`guarded` runs the whole evaluation and closes its run (FAILED with the one-line reason, KILLED
on Ctrl-C or SIGTERM) even when the failure is the store itself: a write it refuses (disk full,
read-only) is reported on the same one line, with where the per-case rows are kept and, should
the run stay RUNNING, how the next run closes it.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from requests import RequestException

from evalharness.errors import HarnessError, StoreError, one_line
from evalharness.track import tracking
from evalharness.track.liveness import liveness_tags

EXIT_OK, EXIT_ERROR, EXIT_CASES_FAILED = 0, 1, 2
log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Outcome:
    """How one evaluation ended: exit code, its run (or the finished one it skipped to)."""

    code: int
    run_id: str | None
    skipped: bool = False
    case_ids: tuple[str, ...] = ()  # the cases it was to evaluate (known once planned)
    error: str = ""  # the one line an evaluation that stopped printed (with or without a run)


def tracking_uri_of(tracking_uri: str | None) -> str:
    """The evaluation store's URI (`mlflow.tracking_uri`; null: the default store under the
    current folder), local paths made absolute."""
    uri = tracking_uri or tracking.default_tracking_uri(Path.cwd())
    return tracking.absolute_tracking_uri(uri)


class LazyRun:
    """The evaluation run, created once the configuration has started (planned, prepared):
    a configuration that cannot start creates none."""

    def __init__(
        self,
        client: Any,
        experiment_id: str,
        name: str | None,
        parent: str | None,
        setting: str = "",
    ):
        self.client, self.experiment_id, self.name = client, experiment_id, name
        self.setting = setting  # the values set on the command line, for the default name
        self.tags = {"evalharness.kind": "evaluation", **liveness_tags()}
        if parent is not None:
            self.tags["mlflow.parentRunId"] = parent
        self.run_id: str | None = None
        self.case_ids: tuple[str, ...] = ()  # set once the cases are listed
        self.output_dir: Path | None = None  # where the outputs go, once known
        self.table_path: Path | None = None  # the per-case rows on disk, once written

    def ensure(self) -> str:
        if self.run_id is None:
            self.run_id = tracking.create_run(self.client, self.experiment_id, self.name, self.tags)
        return self.run_id


def guarded(run: LazyRun, action: Callable[[], T]) -> T | Outcome:
    """`action()`, its run never left RUNNING where the store can still be written: a
    `HarnessError`, or a write the file system refused (disk full, read-only), is one line on
    stderr and a FAILED run (the outcome says so); Ctrl-C and SIGTERM mark it KILLED,
    anything else FAILED, and both propagate. A configuration that fails before its run was
    created (it could not start: validation, an unknown run, missing data, a model that does
    not load) creates none."""
    try:
        return action()
    except (HarnessError, OSError) as error:
        message = user_message(error, run)
        if message is None:
            close_run(run, "FAILED", f"internal error: {one_line(error)}")
            raise
        message += close_run(run, "FAILED", message)
        print(f"error: {message}", file=sys.stderr)
        log.debug("where the error was raised (hydra.verbose=true shows this)", exc_info=True)
        return Outcome(EXIT_ERROR, run.run_id, case_ids=run.case_ids, error=message)
    except KeyboardInterrupt:
        close_run(run, "KILLED", "interrupted")
        raise
    except BaseException as error:
        close_run(run, "FAILED", f"internal error: {one_line(error)}")
        raise


def user_message(error: BaseException, run: LazyRun) -> str | None:
    """The error line for `error` (None: a bug, not the user's to fix): a file-system write
    failure names the file (else the outputs folder) and the cause; where the store could not
    be written, where the rows computed so far are kept."""
    if isinstance(error, OSError):
        cause = tracking.write_failure(error)
        if cause is None:
            return None
        where = error.filename or f"hydra.runtime.output_dir={run.output_dir}"
        return f"{where}: cannot write ({cause})"
    message = one_line(error)
    if isinstance(error, StoreError) and run.table_path is not None:
        message += f"; the per-case rows so far are kept in {run.table_path}"
    return message


def close_run(run: LazyRun, status: str, reason: str) -> str:
    """Finish `run` with `status`; "" when done (or when it was never created: nothing to
    close), else why it stays RUNNING (the store cannot be written): the next run of the
    setting marks it KILLED and resumes it."""
    if run.run_id is None:
        return ""
    try:
        tracking.finish(run.client, run.ensure(), status, reason)
        return ""
    except StoreError:
        pass
    try:  # the reason may be what no longer fits: at least the status
        tracking.finish(run.client, run.ensure(), status)
        return ""
    except StoreError as error:
        cause = tracking.write_failure(error.__cause__ or error) or "the store refused the write"
        return (
            f"; run {run.run_id} could not be closed ({cause}): the same command marks it "
            "KILLED and resumes it once the store can be written"
        )


def record_failure(error: HarnessError) -> Outcome:
    """For an error found before `evaluate` could start: one line on stderr, no run."""
    message = one_line(error)
    print(f"error: {message}", file=sys.stderr)
    return Outcome(EXIT_ERROR, None, error=message)


def store_error(uri: str, error: Exception) -> str:
    """One line for an unusable tracking store; a server that does not answer said plainly."""
    if isinstance(error, HarnessError):  # says what is wrong already
        message = one_line(error)
        return f"mlflow.tracking_uri={message}" if message.startswith(f"{uri}:") else message
    cause = error if isinstance(error, RequestException) else error.__cause__ or error.__context__
    if not isinstance(cause, RequestException):
        return f"mlflow.tracking_uri={uri}: {tracking.write_failure(error) or one_line(error)}"
    reason = re.search(r"\[Errno -?\d+\] ([^'\"()]+)", str(cause))
    return (
        f"mlflow.tracking_uri={uri}: cannot reach the tracking server "
        f"({reason.group(1).strip() if reason else type(cause).__name__}); "
        "expected a running MLflow server there, or a local sqlite:/// or file: URI"
    )

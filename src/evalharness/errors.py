"""User-facing errors: each carries a one-line message naming the file, case or key at fault.

The CLI prints ``str(error)`` without a traceback (unless ``hydra.verbose`` is set), marks the
MLflow run FAILED with the message as a tag, and exits non-zero. A stop by signal (Ctrl-C,
SIGTERM, SIGHUP) unwinds as `KeyboardInterrupt` so that every open run is closed KILLED on the
way out; the shell then exits 128 + the signal's number (130, 143, 129), as shells report a
process a signal ended.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_SIGTERM_SEEN = threading.Event()


class HarnessError(Exception):
    """Base class of errors whose message is meant for the user, on one line."""


class ConfigError(HarnessError):
    """A configuration value is missing or out of range (the message names the key)."""


class SourceError(HarnessError):
    """The model or training configuration could not be found, fetched or loaded safely."""


class StoreError(HarnessError):
    """The tracking store or its artifacts cannot be written (disk full, read-only, ...)."""


class DataError(HarnessError):
    """The dataset, split or manifest is unusable as a whole (not a single case)."""


class CaseError(HarnessError):
    """One case cannot be evaluated (bad file, grid mismatch, ...); other cases go on.

    `findings` holds the data-level check results (`mismatches.Mismatch`) behind the failure,
    such as a header disagreement, so the mismatch report can include them.
    """

    def __init__(self, message: str, findings: tuple = ()) -> None:
        super().__init__(message)
        self.findings = findings


def one_line(error: BaseException) -> str:
    """`error`'s whole message on one line (its type name if it has none): what the CLI prints
    and what the run's `evalharness.error` tag holds."""
    return " ".join(str(error).split()) or type(error).__name__


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message (its type name if it has none), at most 300
    characters: for one-line messages that quote an error from a library."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


class Stopped(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop or time-out, ``kill``) or SIGHUP (the terminal closed),
    raised where Python was running."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def stop_on_sigterm() -> None:
    """Let SIGTERM and SIGHUP unwind like Ctrl-C (`Stopped`), so runs get closed, not left
    RUNNING. Only from the main thread, and only where nobody else handles the signal
    (``nohup`` ignores SIGHUP: it stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) in (signal.SIG_DFL, _stop):
            signal.signal(signum, _stop)


def sigterm_seen() -> bool:
    """Whether this process got SIGTERM or SIGHUP (its scheduler's kill follows soon)."""
    return _SIGTERM_SEEN.is_set()


def _stop(signum: int, frame: Any) -> None:
    """Raise `Stopped` now; a second stop signal is ignored so the runs' closing is not cut
    short. Should it land where Python ignores exceptions (a weakref callback, a ``__del__``),
    the sweep raises it again after the running job (`sigterm_seen`)."""
    _SIGTERM_SEEN.set()
    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise Stopped(signum)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Name `path` in an `OSError` raised while writing it: a full disk's error raised by a
    stream (gzip, pandas) names no file, and the user must learn which one."""
    try:
        yield
    except OSError as error:
        if error.filename or not error.errno:
            raise
        raise OSError(error.errno, error.strerror, str(path)) from error

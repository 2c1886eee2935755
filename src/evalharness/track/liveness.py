"""Which process owns a RUNNING run: tags written when it starts, and the check that it is gone.

A run whose process was killed outright (SIGKILL, out of memory) stays RUNNING in MLflow; the
next evaluation of the same setting, or the next sweep, closes it as KILLED when its process no
longer exists on this host. Runs of other hosts are left alone: their liveness cannot be seen.
"""

from __future__ import annotations

import os
import socket

from mlflow.entities import Run

PID_TAG = "evalharness.pid"
HOST_TAG = "evalharness.host"


def liveness_tags() -> dict[str, str]:
    """The tags that name this process: its pid and host."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def process_alive(run: Run) -> bool:
    """Whether the process that created `run` may still be running (True when unknowable)."""
    tags = run.data.tags
    if tags.get(HOST_TAG) != socket.gethostname():
        return True  # cannot tell from here: leave another machine's run alone
    pid = int(tags.get(PID_TAG, "0") or 0)
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

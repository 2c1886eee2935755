"""One download per cache entry, whatever the number of processes asking: the entry is built in
a staging folder beside it and appears by atomic rename, under a file lock, so a reader never
sees half an entry and a second caller waits for the first instead of downloading again."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

from evalharness.errors import SourceError

LOCK_TIMEOUT_S = 900


def build_once(entry: Path, build: Callable[[Path], Path]) -> bool:
    """Make `entry` unless it exists: `build(staging)` downloads into the empty folder `staging`
    and returns the path to rename to `entry`. Returns whether this call built it."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(f"{entry}.lock", timeout=LOCK_TIMEOUT_S):
            if entry.exists():
                return False
            staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".staging-"))
            try:
                os.replace(build(staging), entry)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return True
    except Timeout:
        raise SourceError(f"timed out waiting for the cache lock {entry}.lock") from None

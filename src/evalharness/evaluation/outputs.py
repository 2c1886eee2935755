"""The outputs folder: checked before anything is written there, by Hydra or by the harness.

Hydra creates `hydra.run.dir` (or `hydra.sweep.dir`) before the task starts and reports a
failure with a traceback; the shell's `cli.OutputsCheck` callback runs `check_outputs_folder`
first and ends with one line and a FAILED run instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from evalharness.errors import ConfigError


def unwritable_reason(folder: Path) -> str | None:
    """Why `folder` cannot be created or written, or None; creates nothing.

    Looks at the nearest existing ancestor: a regular file there, or a folder without write
    access (`os.access`, which also sees read-only file systems), stops the folder.
    """
    for existing in (folder, *folder.parents):
        if not existing.exists():
            continue
        if not existing.is_dir():
            return f"{existing} is not a folder"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"{existing} is not writable"
        return None
    return None


def check_outputs_folder(folder: Path, key: str) -> None:
    """`ConfigError` naming `key` when `folder` cannot hold the outputs."""
    reason = unwritable_reason(Path(folder).absolute())
    if reason is not None:
        raise ConfigError(
            f"{key}={folder}: cannot write the outputs there ({reason}); "
            "expected a folder that can be created and written"
        )

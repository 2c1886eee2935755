"""A sweep's shared state on disk: what every job needs to know, and one record per job.

The sweep callback writes ``<sweep dir>/.evalharness/sweep.json`` when the multirun starts and
``jobs/<num>.json`` when a job ends, wherever the launcher ran it (this process, loky workers,
submitit processes or nodes sharing the sweep folder). Writes are atomic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from evalharness.score.comparison import JobRecord

STATE_DIR = ".evalharness"


@dataclass(frozen=True)
class SweepState:
    """What every job needs to know about its sweep (``.evalharness/sweep.json``)."""

    parent_run_id: str
    tracking_uri: str
    swept_keys: tuple[str, ...]
    primary_metric: str
    plots: bool = True  # output.plots: comparison figures on the parent
    experiment_id: str = ""


def write_state(sweep_dir: Path, state: SweepState) -> None:
    write_json(sweep_dir / STATE_DIR / "sweep.json", asdict(state))


def read_state(sweep_dir: Path) -> SweepState | None:
    """The sweep's state, or None when no sweep callback ran (a multirun without a parent)."""
    path = sweep_dir / STATE_DIR / "sweep.json"
    if not path.is_file():
        return None
    values = json.loads(path.read_text())
    return SweepState(**{**values, "swept_keys": tuple(values["swept_keys"])})


def read_records(sweep_dir: Path) -> list[JobRecord]:
    folder = sweep_dir / STATE_DIR / "jobs"
    paths = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return [JobRecord(**json.loads(p.read_text())) for p in paths]


def write_json(path: Path, value: Any) -> None:
    """Write atomically: readers in other processes never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(value, indent=2, default=str))
    partial.replace(path)


def setting_of(
    task_overrides: Sequence[str], keys: Sequence[str], num: int
) -> tuple[str, dict[str, str]]:
    """(name, swept values) of a job: ``aggregation=hann,overlap=0.5`` from its overrides.

    Keys are shortened to their last part unless two swept keys share it.
    """
    values: dict[str, str] = {}
    for text in task_overrides:
        key, _, value = text.lstrip("+~").partition("=")
        if key in keys:
            values[key] = value
    last = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: s if last.count(s) == 1 else k for k, s in zip(keys, last, strict=True)}
    ordered = sorted(values, key=lambda k: short[k])
    name = ",".join(f"{short[k]}={values[k]}" for k in ordered) or f"job{num}"
    return name, values

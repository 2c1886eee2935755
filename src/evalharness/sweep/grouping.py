"""Sweep groups: the jobs of a sweep that share their forward passes, and how one job runs them.

When a multirun starts, the callback expands its overrides as Hydra's basic sweeper does and
writes ``.evalharness/groups.json``: every job's overrides and its group, the hash of its
overrides of keys that decide the forward passes (all but `SHARABLE_KEYS` and ``metrics.*``).
The first job of a group to start claims it (``groups/<group>.claim``, created exclusively,
so one claimant whatever the launcher) and evaluates every member in one pass over the cases
(`sweep.group_pass`); each member's outcome goes to ``done/<num>.json`` and its outputs to
``outputs/<num>/``. The other jobs of the group wait for their record, move their outputs
into their own folder and return the outcome: with the default launcher they find it at once;
with joblib or submitit workers the group runs on the claimant's worker while the others wait.
A claim whose process is gone (this host: its pid; another host: no heartbeat for
`STALE_AFTER_S`) is ignored and the job evaluates on its own.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from evalharness.config.settings import stable_hash
from evalharness.sweep.state import STATE_DIR, write_json

SHARABLE_KEYS = frozenset(
    {
        "inference.aggregation",
        "inference.keep_largest_component",
        "inference.threshold",
        "inference.tta",
        "inference.restore",
    }
)
"""Keys whose settings can share forward passes: what they change happens after them (TTA: the
identity flip and any flip two settings both use); every ``metrics.*`` key too."""

HEARTBEAT_S = 5.0
STALE_AFTER_S = 120.0
POLL_S = 0.5


def is_sharable(key: str) -> bool:
    """Whether settings differing in `key` can share their forward passes."""
    return key in SHARABLE_KEYS or key.startswith("metrics.")


@dataclass(frozen=True)
class PlannedJob:
    """One job of the sweep as the basic sweeper numbers it: its overrides, its group and its
    overrides of sharable keys (what makes it differ from the rest of its group)."""

    num: int
    overrides: tuple[str, ...]
    group: str
    shared: tuple[str, ...]


def plan_jobs(job_overrides: Sequence[Sequence[str]]) -> list[PlannedJob]:
    """Group the expanded jobs (job ``num`` = its index) by their non-sharable overrides."""
    planned = []
    for num, overrides in enumerate(job_overrides):
        shared = tuple(o for o in overrides if _sharable_override(o))
        deciding = [o for o in overrides if not _sharable_override(o)]
        planned.append(PlannedJob(num, tuple(overrides), stable_hash(deciding), shared))
    return planned


def _sharable_override(text: str) -> bool:
    """A plain ``key=value`` override of a sharable key (``+``/``~`` forms decide the group)."""
    key, _, _ = text.partition("=")
    return key[:1] not in "+~" and is_sharable(key)


def write_groups(sweep_dir: Path, jobs: Sequence[PlannedJob]) -> None:
    write_json(_state(sweep_dir) / "groups.json", [asdict(j) for j in jobs])


def read_jobs(sweep_dir: Path) -> list[PlannedJob]:
    """The planned jobs (none when the sweep was not planned: another sweeper)."""
    path = _state(sweep_dir) / "groups.json"
    if not path.is_file():
        return []
    return [
        PlannedJob(j["num"], tuple(j["overrides"]), j["group"], tuple(j["shared"]))
        for j in json.loads(path.read_text())
    ]


def group_of(sweep_dir: Path, num: int, task_overrides: Sequence[str]) -> list[PlannedJob]:
    """The other jobs of job `num`'s group; none when the sweep was not planned or the job is
    not the one planned under its number."""
    jobs = read_jobs(sweep_dir)
    mine = next((j for j in jobs if j.num == num), None)
    if mine is None or mine.overrides != tuple(task_overrides):
        return []
    return [j for j in jobs if j.group == mine.group and j.num != num]


def clear(sweep_dir: Path) -> None:
    """Forget the claims, records and outputs of an earlier sweep in the same folder."""
    for name in ("groups", "done", "outputs"):
        shutil.rmtree(_state(sweep_dir) / name, ignore_errors=True)


def staged_dir(sweep_dir: Path, num: int) -> Path:
    """Where the claimant writes job `num`'s outputs until that job moves them."""
    return _state(sweep_dir) / "outputs" / f"{num:05d}"


@dataclass(frozen=True)
class DoneRecord:
    """A member's outcome, written by the claimant for the member's own job to return."""

    code: int
    run_id: str | None
    skipped: bool
    case_ids: tuple[str, ...]
    error: str = ""


def write_done(sweep_dir: Path, num: int, record: DoneRecord) -> None:
    write_json(_state(sweep_dir) / "done" / f"{num:05d}.json", asdict(record))


def read_done(sweep_dir: Path, num: int) -> DoneRecord | None:
    path = _state(sweep_dir) / "done" / f"{num:05d}.json"
    if not path.is_file():
        return None
    values = json.loads(path.read_text())
    return DoneRecord(**{**values, "case_ids": tuple(values["case_ids"])})


def try_claim(sweep_dir: Path, group: str, num: int) -> bool:
    """Claim `group` for job `num`; False when another job holds it."""
    path = _claim_path(sweep_dir, group)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    owner = {"num": num, "pid": os.getpid(), "host": socket.gethostname()}
    with os.fdopen(descriptor, "w") as handle:
        json.dump(owner, handle)
    return True


@contextmanager
def heartbeat(sweep_dir: Path, group: str) -> Iterator[None]:
    """Touch the claim every `HEARTBEAT_S` while the group runs (waiters on other hosts see
    the claimant is alive)."""
    path, stop = _claim_path(sweep_dir, group), threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            path.touch(exist_ok=True)

    thread = threading.Thread(target=beat, name="sweep-group-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def release(sweep_dir: Path, group: str) -> None:
    """Tell the group's waiting jobs to evaluate on their own (the claimant cannot run it)."""
    _claim_path(sweep_dir, group).with_suffix(".released").touch()


def wait_for(sweep_dir: Path, group: str, num: int) -> DoneRecord | None:
    """Job `num`'s record once the claimant wrote it; None when the claimant is gone first
    or released the group."""
    claim = _claim_path(sweep_dir, group)
    announced = False
    while True:
        record = read_done(sweep_dir, num)
        if record is not None:
            return record
        if claim.with_suffix(".released").exists() or not _claimant_alive(claim):
            return None
        if not announced:
            print(f"sweep group: waiting for the job evaluating it ({claim.read_text()})")
            announced = True
        time.sleep(POLL_S)


def take_outputs(sweep_dir: Path, num: int, output_dir: Path) -> None:
    """Move job `num`'s outputs written by the claimant into the job's own folder."""
    staged = staged_dir(sweep_dir, num)
    if not staged.is_dir():
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    for entry in staged.iterdir():
        target = output_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        shutil.move(str(entry), target)
    staged.rmdir()


def _claimant_alive(claim: Path) -> bool:
    try:
        owner = json.loads(claim.read_text())
        age = time.time() - claim.stat().st_mtime
    except (OSError, ValueError):
        return False
    if owner.get("host") != socket.gethostname():
        return age < STALE_AFTER_S
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim_path(sweep_dir: Path, group: str) -> Path:
    return _state(sweep_dir) / "groups" / f"{group}.claim"


def _state(sweep_dir: Path) -> Path:
    return sweep_dir / STATE_DIR

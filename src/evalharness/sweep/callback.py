"""Sweeps: one MLflow parent run per Hydra multirun, a child per job, a comparison on the parent.

`SweepCallback` (registered under ``hydra.callbacks``) creates the parent when the multirun
starts and writes ``<sweep dir>/.evalharness/sweep.json``; every job, whatever the launcher
(basic: this process; joblib: loky workers; submitit: other processes or nodes sharing the sweep
folder), reads it (`sweep.jobs.evaluate_job`) and evaluates as a child of the parent, named
after its swept overrides. When a job ends, `on_job_end` (run where the job ran) writes the
job's record next to it and refreshes the comparison on the parent (at most every
`REFRESH_AFTER_S` seconds). When the multirun ends, the
parent is closed FINISHED, or FAILED with the failed settings as the reason, and the process
exits non-zero if any job failed. Hydra does not call `on_multirun_end` when a job raised, nor
after Ctrl-C (SIGTERM is turned into Ctrl-C): an `atexit` guard then closes the parent (FAILED,
or KILLED when no job failed). A parent whose process was killed outright (SIGKILL, out of
memory) is closed as KILLED by the next sweep in its experiment on the same host.
"""

from __future__ import annotations

import atexit
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from evalharness.errors import Stopped, sigterm_seen, stop_on_sigterm
from evalharness.evaluation.lifecycle import EXIT_ERROR, Outcome, tracking_uri_of
from evalharness.score.comparison import SHARD_KEY, JobRecord, report, status_of
from evalharness.sweep import grouping
from evalharness.sweep.parent_report import closing_status, refresh
from evalharness.sweep.state import STATE_DIR, SweepState, setting_of, write_json, write_state
from evalharness.track import tracking, ui_links
from evalharness.track.liveness import liveness_tags, process_alive

REFRESH_AFTER_S = 10.0
"""After a job, the parent's comparison is refreshed when the last refresh in this process is
at least this old (a group's jobs end within a second of each other); the end always does."""


def swept_keys(hydra_cfg: DictConfig) -> tuple[str, ...]:
    """Keys the sweep varies: command-line sweep overrides and ``hydra.sweeper.params``."""
    parsed = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    params = OmegaConf.select(hydra_cfg, "sweeper.params") or {}
    return tuple(dict.fromkeys([*keys, *params]))


BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def expand_jobs(hydra_cfg: DictConfig) -> list[list[str]] | None:
    """Every job's overrides in the order Hydra's basic sweeper numbers them (its
    ``params`` first, then the command line); None for another sweeper or overrides it would
    expand itself (``glob``, ranges resolved against the config)."""
    if OmegaConf.select(hydra_cfg, "sweeper._target_") != BASIC_SWEEPER:
        return None
    params = OmegaConf.select(hydra_cfg, "sweeper.params") or {}
    texts = [f"{k}={v}" for k, v in params.items()] + list(hydra_cfg.overrides.task)
    try:
        parsed = OverridesParser.create().parse_overrides(texts)
        batches = BasicSweeper.split_arguments(parsed, None)
    except Exception:  # noqa: BLE001 - the sweeper reports its own errors; no groups then
        return None
    return [list(job) for batch in batches for job in batch]


def _num(hydra_cfg: DictConfig) -> int:
    return int(hydra_cfg.job.num)


class SweepCallback(Callback):
    """Owns a sweep's parent run: created at the start, compared after each job, always closed.

    State set in `on_multirun_start` travels with the callback to joblib and submitit workers
    (Hydra pickles it with the launch context).
    """

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None
        self.state: SweepState | None = None
        self.closed = False
        self.refreshed_at: float | None = None  # monotonic time of the last comparison here

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).absolute()
        uri = tracking_uri_of(config.mlflow.tracking_uri)
        client, experiment = tracking.open_experiment(uri, config.mlflow.experiment)
        keys = swept_keys(config.hydra)
        tags = {
            "evalharness.kind": "sweep",
            "evalharness.sweep_dir": str(sweep_dir),
            **liveness_tags(),
        }
        close_orphaned_parents(client, experiment)
        parent = tracking.create_run(client, experiment, sweep_dir.name, tags)
        self.sweep_dir = sweep_dir
        primary = str(config.sweep.primary_metric)
        for key, value in ui_links.sweep_view_tags(parent, primary).items():
            tracking.set_experiment_tag(client, experiment, key, value)
        plots = bool(config.output.plots)
        self.state = SweepState(parent, uri, keys, primary, plots, experiment)
        atexit.register(self._close_at_exit)
        stop_on_sigterm()
        tracking.log_params(
            client,
            parent,
            {
                "sweep.swept": ",".join(keys) or "none",
                "sweep.overrides": " ".join(config.hydra.overrides.task),
                "sweep.primary_metric": config.sweep.primary_metric,
                "sweep.resume": config.sweep.resume,
                "sweep.launcher": OmegaConf.select(config, "hydra.launcher._target_"),
            },
        )
        for stale in (sweep_dir / STATE_DIR / "jobs").glob("*.json"):
            stale.unlink()  # a sweep folder reused by hand: forget the earlier jobs
        grouping.clear(sweep_dir)
        expanded = expand_jobs(config.hydra)
        if expanded is not None:
            grouping.write_groups(sweep_dir, grouping.plan_jobs(expanded))
        write_state(sweep_dir, self.state)
        print(f"sweep: parent run {parent} ({sweep_dir.name}) in {uri}")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.state is None or self.sweep_dir is None:
            return  # a single run, or the parent could not be created
        hydra_cfg = config.hydra
        num = _num(hydra_cfg)
        unsharded = tuple(k for k in self.state.swept_keys if k != SHARD_KEY)
        name, values = setting_of(hydra_cfg.overrides.task, unsharded, num)
        if SHARD_KEY in self.state.swept_keys and not unsharded:
            name = "all"  # only the shards are swept: one setting
        shard = setting_of(hydra_cfg.overrides.task, (SHARD_KEY,), num)[1].get(SHARD_KEY, "")
        record = dataclasses.replace(_record(num, name, values, job_return), shard=shard)
        write_json(self.sweep_dir / STATE_DIR / "jobs" / f"{num:05d}.json", record.to_dict())
        now = time.monotonic()
        if self.refreshed_at is None or now - self.refreshed_at >= REFRESH_AFTER_S:
            refresh(self.sweep_dir, self.state, final=False)
            self.refreshed_at = time.monotonic()
        if sigterm_seen():
            raise Stopped()  # not an Exception: ends the sweep

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.state is None or self.closed:
            return
        code = self._close(complete=True)
        if code:
            print(f"sweep: exit code {code} (some jobs failed)", file=sys.stderr)
            raise SystemExit(code)  # not an Exception: Hydra lets it end the process

    def _close_at_exit(self) -> None:
        if self.state is not None and not self.closed:
            self._close(complete=False)

    def _close(self, complete: bool) -> int:
        """Final comparison, parent status, report; returns the sweep's exit code."""
        assert self.state is not None and self.sweep_dir is not None
        self.closed = True
        client = tracking.prepare_store(self.state.tracking_uri)
        try:
            stopped = sigterm_seen()  # SIGTERM: the scheduler's kill follows soon
            comparison = refresh(self.sweep_dir, self.state, final=True, figures=not stopped)
        except Exception as error:  # the parent must still be closed
            tracking.finish(client, self.state.parent_run_id, "FAILED", f"comparison: {error}")
            raise
        status, reason, code = closing_status(comparison, complete)
        tracking.finish(client, self.state.parent_run_id, status, reason)
        print(f"\nSweep comparison (parent run {self.state.parent_run_id}, {status}):")
        print(report(comparison))
        if reason:
            print(f"sweep {status.lower()}: {reason}", file=sys.stderr)
        print("\n".join(where_lines(self.sweep_dir, self.state, comparison)))
        return code


def where_lines(sweep_dir: Path, state: SweepState, comparison: Any) -> list[str]:
    """The sweep's last lines: its folder and the parent, its settings and their comparison
    in the UI."""
    uri, experiment, parent = state.tracking_uri, state.experiment_id, state.parent_run_id
    base = ui_links.ui_base(uri)
    table = comparison.table
    children = [r for r in table.get("run_id", []) if r]
    view = ui_links.sweep_view_key(parent)
    links = [
        ("parent run", ui_links.run_link(base, experiment, parent)),
        ("its settings", ui_links.runs_table_link(base, experiment, view)),
    ]
    if children:
        links.append(("compare them", ui_links.compare_link(base, experiment, children)))
    contents = "summary.html, comparison.csv, plots/, a folder per job"
    return ui_links.where_lines(uri, str(sweep_dir), contents, links)


def close_orphaned_parents(client: Any, experiment: str) -> None:
    """Close parents left RUNNING by a sweep process killed outright (SIGKILL, out of memory)."""
    for run in tracking.runs_with_tag(client, experiment, "evalharness.kind", "sweep"):
        if run.info.status == "RUNNING" and not process_alive(run):
            message = "the sweep process ended without closing its parent run"
            tracking.finish(client, run.info.run_id, "KILLED", message)


def _record(num: int, setting: str, values: dict[str, str], job_return: JobReturn) -> JobRecord:
    if job_return.status == JobStatus.COMPLETED:
        value = job_return.return_value
        if isinstance(value, Outcome):
            status = status_of(value.code, value.skipped)
            return JobRecord(
                num,
                setting,
                values,
                status,
                value.code,
                value.run_id,
                value.error,
                cases=list(value.case_ids),
            )
        code = int(value or 0)
        return JobRecord(num, setting, values, status_of(code, False), code, None)
    error = getattr(job_return, "_return_value", None)  # the exception (the property re-raises)
    reason = " ".join(str(error).split()) or type(error).__name__
    return JobRecord(num, setting, values, "failed", EXIT_ERROR, None, f"raised: {reason}")

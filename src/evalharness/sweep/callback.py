"""Sweeps: one MLflow parent run per Hydra multirun, a child per job, a comparison on the parent.

`SweepCallback` (registered under ``hydra.callbacks``) creates the parent when the multirun
starts and writes ``<sweep dir>/.evalharness/sweep.json``; every job, whatever the launcher
(basic: this process; joblib: loky workers; submitit: other processes or nodes sharing the
sweep folder), reads it in `evaluate_job` and evaluates as a child of the parent, named after
its swept overrides. When a job ends, `on_job_end` (run where the job ran) writes the job's
record next to it and refreshes the comparison on the parent. When the multirun ends, the
parent is closed FINISHED, or FAILED with the failed settings as the reason, and the process
exits non-zero if any job failed. Hydra does not call `on_multirun_end` when a job raised, nor
after Ctrl-C (SIGTERM is turned into Ctrl-C): an `atexit` guard then closes the parent (FAILED,
or KILLED when no job failed). A parent whose process was killed outright (SIGKILL, out of
memory) is closed as KILLED by the next sweep in its experiment on the same host.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from evalharness.evaluation.run import EXIT_ERROR, Outcome, evaluate, process_alive, tracking_uri_of
from evalharness.score.comparison import (
    Comparison,
    JobRecord,
    RunData,
    base_metric,
    compare,
    describe_test,
    report,
    status_of,
)
from evalharness.score.table import HEADLINE
from evalharness.sweep.cache import shared_cache
from evalharness.track import tracking

STATE_DIR = ".evalharness"
REPLOT_AFTER_S = 60.0
_STOP_REQUESTED = threading.Event()  # SIGTERM seen (see `_stop`)


@dataclass(frozen=True)
class SweepState:
    """What every job needs to know about its sweep (``.evalharness/sweep.json``)."""

    parent_run_id: str
    tracking_uri: str
    swept_keys: tuple[str, ...]
    primary_metric: str
    plots: bool = True  # output.plots: comparison figures on the parent


def write_state(sweep_dir: Path, state: SweepState) -> None:
    _write_json(sweep_dir / STATE_DIR / "sweep.json", asdict(state))


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


def _write_json(path: Path, value: Any) -> None:
    """Write atomically: readers in other processes never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(value, indent=2, default=str))
    partial.replace(path)


def swept_keys(hydra_cfg: DictConfig) -> tuple[str, ...]:
    """Keys the sweep varies: command-line sweep overrides and ``hydra.sweeper.params``."""
    parsed = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    params = OmegaConf.select(hydra_cfg, "sweeper.params") or {}
    return tuple(dict.fromkeys([*keys, *params]))


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


def evaluate_job(cfg: DictConfig, hydra_cfg: DictConfig) -> Outcome:
    """One job of a multirun: a child of the sweep's parent that shares this process's cache.

    Skips the setting when a FINISHED run with the same configuration hash exists
    (``sweep.resume``); logs the cache counters of this job as ``cache.*`` metrics.
    """
    state = read_state(Path(hydra_cfg.sweep.dir).absolute())
    if state is not None and cfg.mlflow.run_name is None:
        cfg.mlflow.run_name = setting_of(
            hydra_cfg.overrides.task, state.swept_keys, _num(hydra_cfg)
        )[0]
    cache = shared_cache(float(cfg.sweep.cache_mb))
    before = cache.counters()
    outcome = evaluate(
        cfg,
        Path(hydra_cfg.runtime.output_dir),
        parent_run_id=state.parent_run_id if state else None,
        skip_finished=bool(cfg.sweep.resume),
        cache=cache,
    )
    used = cache.counters() - before
    print(f"cache: {used.describe()}; {cache.nbytes / 2**20:.1f} MiB held")
    if outcome.run_id is not None and not outcome.skipped:
        client = tracking.prepare_store(tracking_uri_of(cfg))
        tracking.log_metrics(client, outcome.run_id, used.as_metrics())
    return outcome


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

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).absolute()
        uri = tracking_uri_of(config)
        client = tracking.prepare_store(uri)
        experiment = tracking.experiment_id(client, uri, config.mlflow.experiment)
        keys = swept_keys(config.hydra)
        tags = {
            "evalharness.kind": "sweep",
            "evalharness.sweep_dir": str(sweep_dir),
            "evalharness.pid": str(os.getpid()),
            "evalharness.host": socket.gethostname(),
        }
        close_orphaned_parents(client, experiment)
        parent = tracking.create_run(client, experiment, sweep_dir.name, tags)
        self.sweep_dir = sweep_dir
        primary = str(config.sweep.primary_metric)
        self.state = SweepState(parent, uri, keys, primary, bool(config.output.plots))
        atexit.register(self._close_at_exit)
        _terminate_as_interrupt()
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
        write_state(sweep_dir, self.state)
        print(f"sweep: parent run {parent} ({sweep_dir.name}) in {uri}")

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.state is None or self.sweep_dir is None:
            return  # a single run, or the parent could not be created
        hydra_cfg = config.hydra
        num = _num(hydra_cfg)
        name, values = setting_of(hydra_cfg.overrides.task, self.state.swept_keys, num)
        record = _record(num, name, values, job_return)
        _write_json(self.sweep_dir / STATE_DIR / "jobs" / f"{num:05d}.json", record.to_dict())
        refresh(self.sweep_dir, self.state, final=False)
        if _STOP_REQUESTED.is_set():
            raise KeyboardInterrupt("stopped by SIGTERM")  # not an Exception: ends the sweep

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
            comparison = refresh(self.sweep_dir, self.state, final=True)
        except Exception as error:  # the parent must still be closed
            tracking.finish(client, self.state.parent_run_id, "FAILED", f"comparison: {error}")
            raise
        status, reason, code = closing_status(comparison, complete)
        tracking.finish(client, self.state.parent_run_id, status, reason)
        print(f"\nSweep comparison (parent run {self.state.parent_run_id}, {status}):")
        print(report(comparison))
        if reason:
            print(f"sweep {status.lower()}: {reason}", file=sys.stderr)
        return code


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
            return JobRecord(num, setting, values, status, value.code, value.run_id)
        code = int(value or 0)
        return JobRecord(num, setting, values, status_of(code, False), code, None)
    error = getattr(job_return, "_return_value", None)  # the exception (the property re-raises)
    reason = " ".join(str(error).split()) or type(error).__name__
    return JobRecord(num, setting, values, "failed", EXIT_ERROR, None, f"raised: {reason}")


def closing_status(comparison: Comparison, complete: bool) -> tuple[str, str | None, int]:
    """(parent status, reason, exit code) of a sweep that ended (`complete`: Hydra finished)."""
    table = comparison.table
    failed = table[~table["status"].isin(["finished", "skipped"])] if len(table) else table
    if len(failed):
        reasons = "; ".join(f"{r.setting}: {r.error or r.status}" for r in failed.itertuples())
        code = EXIT_ERROR if (failed["status"] == "failed").any() else 2
        return "FAILED", f"{len(failed)} of {len(table)} job(s) failed: {reasons}", code
    if not complete:
        return "KILLED", "the sweep ended before all jobs finished (interrupted or crashed)", 1
    return "FINISHED", None, 0


def refresh(sweep_dir: Path, state: SweepState, final: bool) -> Comparison:
    """Recompute the comparison from the job records and log it to the parent run.

    Writes ``comparison.csv``, ``comparison_stats.json`` and ``plots/`` (unless
    ``output.plots=false``) in the sweep folder and on the parent. After a job, the primary
    metric's figures are redrawn when the last drawing is older than `REPLOT_AFTER_S` (seconds
    of plotting per job would dominate sweeps of quick jobs); `final` draws every headline
    metric. Serialised by a file lock (parallel jobs end at the same time).
    """
    with FileLock(str(sweep_dir / STATE_DIR / "comparison.lock"), timeout=600):
        client = tracking.prepare_store(state.tracking_uri)
        records = read_records(sweep_dir)
        runs = {
            r.run_id: _run_data(client, r.run_id, sweep_dir / STATE_DIR)
            for r in records
            if r.run_id is not None
        }
        comparison = compare(records, runs, state.primary_metric)
        _log_comparison(client, state, sweep_dir, comparison, final)
    return comparison


def _run_data(client: Any, run_id: str, scratch: Path) -> RunData:
    run = client.get_run(run_id)
    per_case = tracking.download_csv(client, run_id, "per_case.csv", scratch)
    return RunData(dict(run.data.metrics), dict(run.data.tags), per_case, run.info.status)


def _log_comparison(
    client: Any, state: SweepState, sweep_dir: Path, comparison: Comparison, final: bool
) -> None:
    table, stats, parent = comparison.table, comparison.stats, state.parent_run_id
    csv_path = sweep_dir / "comparison.csv"
    table.to_csv(csv_path, index=False)
    stats_path = sweep_dir / "comparison_stats.json"
    _write_json(stats_path, json.loads(json.dumps(stats), parse_constant=lambda _: None))  # NaN
    tracking.log_file(client, parent, csv_path)
    tracking.log_file(client, parent, stats_path)
    if state.plots:
        for path in _plots(comparison, state.primary_metric, sweep_dir / "plots", final):
            tracking.log_file(client, parent, path, "plots")
    best = stats["best"] or {}
    tags = {
        "evalharness.best_setting": best.get("setting", "none"),
        "evalharness.best_run_id": best.get("run_id", ""),
        "evalharness.wilcoxon": "; ".join(
            f"{t['setting']}: {describe_test(t)}" for t in stats["tests"]
        )
        or "none",
        "evalharness.tied_with_best": "; ".join(stats["tied_with_best"]) or "none",
    }
    tracking.set_tags(client, parent, tags)
    metrics = {
        "n_settings": stats["n_settings"],
        "n_failed_settings": stats["n_failed"],
        "n_skipped_settings": stats["n_skipped"],
        "n_tied_with_best": len(stats["tied_with_best"]),
    }
    if best:
        metrics[f"best_{stats['primary_metric']}"] = best["value"]
    tracking.log_metrics(client, parent, metrics)


def _plots(comparison: Comparison, primary: str, folder: Path, final: bool) -> list[Path]:
    from evalharness.plots import comparison_plots

    long = comparison.per_case_long
    main = base_metric(primary) or "dsc"
    heatmap = folder / f"heatmap_{main}.png"
    recent = heatmap.is_file() and time.time() - heatmap.stat().st_mtime < REPLOT_AFTER_S
    if long.empty or (recent and not final):
        return []
    metrics = [main, *[m for m in HEADLINE if m != main]] if final else [main]
    paths = [
        comparison_plots.plot_setting_comparison(long, m, folder / f"compare_{m}.png")
        for m in metrics
    ]
    paths.append(comparison_plots.plot_case_setting_heatmap(long, main, heatmap))
    paths.append(comparison_plots.plot_paired_cases(long, main, folder / f"paired_{main}.png"))
    return paths


def _terminate_as_interrupt() -> None:
    """Let SIGTERM (a scheduler's stop) unwind like Ctrl-C, so runs get closed, not orphaned."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _stop)


def _stop(signum: int, frame: Any) -> None:
    """Raise KeyboardInterrupt now; should it land where Python ignores exceptions (a weakref
    callback, a ``__del__``), `on_job_end` raises it again after the running job."""
    _STOP_REQUESTED.set()
    raise KeyboardInterrupt(f"stopped by signal {signum}")

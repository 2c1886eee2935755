"""One job of a multirun: a child run of the sweep's parent that shares this process's cache."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from evalharness.config.schema import EvalConfig
from evalharness.evaluation.run import ConfigCompletion, Outcome, evaluate, tracking_uri_of
from evalharness.sweep.cache import shared_cache
from evalharness.sweep.state import read_state, setting_of
from evalharness.track import tracking


@dataclass(frozen=True)
class Job:
    """Where a job of the multirun stands: what the shell reads of Hydra's job config."""

    sweep_dir: Path  # absolute
    output_dir: Path
    task_overrides: tuple[str, ...]
    num: int


def evaluate_job(config: EvalConfig, job: Job, complete: ConfigCompletion | None = None) -> Outcome:
    """Evaluate `config` as job `job` of its sweep, named after its swept overrides.

    Skips the setting when a FINISHED run with the same configuration hash exists
    (``sweep.resume``); logs the cache counters of this job as ``cache.*`` metrics.
    """
    state = read_state(job.sweep_dir)
    if state is not None and config.mlflow.run_name is None:
        name = setting_of(job.task_overrides, state.swept_keys, job.num)[0]
        config = dataclasses.replace(
            config, mlflow=dataclasses.replace(config.mlflow, run_name=name)
        )
    cache = shared_cache(float(config.sweep.cache_mb))
    before = cache.counters()
    outcome = evaluate(
        config,
        job.output_dir,
        parent_run_id=state.parent_run_id if state else None,
        skip_finished=bool(config.sweep.resume),
        cache=cache,
        complete=complete,
    )
    used = cache.counters() - before
    print(f"cache: {used.describe()}; {cache.nbytes / 2**20:.1f} MiB held")
    if outcome.run_id is not None and not outcome.skipped:
        client = tracking.prepare_store(tracking_uri_of(config.mlflow.tracking_uri))
        tracking.log_metrics(client, outcome.run_id, used.as_metrics())
    return outcome

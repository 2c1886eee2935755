"""One job of a multirun: a child run of the sweep's parent that shares this process's cache."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from evalharness.config.schema import EvalConfig
from evalharness.evaluation.lifecycle import EXIT_ERROR, Outcome, tracking_uri_of
from evalharness.evaluation.run import ConfigCompletion, evaluate
from evalharness.evaluation.saved import uses_saved_predictions
from evalharness.sweep import grouping
from evalharness.sweep.cache import SweepCache, shared_cache
from evalharness.sweep.group_pass import Member, evaluate_group
from evalharness.sweep.grouping import is_sharable
from evalharness.sweep.state import SweepState, read_state, setting_of
from evalharness.track import tracking


@dataclass(frozen=True)
class Job:
    """Where a job of the multirun stands: what the shell reads of Hydra's job config."""

    sweep_dir: Path  # absolute
    output_dir: Path
    task_overrides: tuple[str, ...]
    num: int


@dataclass(frozen=True)
class GroupMember:
    """Another job of this job's sweep group: its number, configuration and overrides."""

    num: int
    config: EvalConfig
    task_overrides: tuple[str, ...]


@dataclass(frozen=True)
class JobStart:
    """A job once it knows its place in the sweep: its config named after its swept overrides,
    the sweep's state, whether it keeps patch outputs for reuse, and either the other planned
    jobs of the sweep group it claimed (the shell composes their configs, as only it reads
    Hydra's config) or the outcome the group's claimant wrote for it."""

    config: EvalConfig
    job: Job
    state: SweepState | None
    share: bool
    claimed: tuple[grouping.PlannedJob, ...] = ()
    outcome: Outcome | None = None


def start_job(config: EvalConfig, job: Job) -> JobStart:
    """Name the job and find its sweep group: with one (`sweep.grouping`) and
    ``sweep.share_forward``, the first job of the group to start claims it; another job waits
    for the claimant's record of it (none when the claimant is gone: it evaluates alone)."""
    state = read_state(job.sweep_dir)
    config = _named(config, job.task_overrides, job.num, state)
    share = shares_forward(config, state.swept_keys if state else ())
    others = grouping.group_of(job.sweep_dir, job.num, job.task_overrides) if state else []
    if not (others and share and not uses_saved_predictions(config)):
        return JobStart(config, job, state, share)
    if grouping.try_claim(job.sweep_dir, others[0].group, job.num):
        return JobStart(config, job, state, share, claimed=tuple(others))
    record = grouping.wait_for(job.sweep_dir, others[0].group, job.num)
    if record is None:
        return JobStart(config, job, state, share)
    grouping.take_outputs(job.sweep_dir, job.num, job.output_dir)
    outcome = Outcome(record.code, record.run_id, record.skipped, record.case_ids, record.error)
    return JobStart(config, job, state, share, outcome=outcome)


def evaluate_job(
    start: JobStart,
    complete: ConfigCompletion | None = None,
    members: Sequence[GroupMember] = (),
) -> Outcome:
    """Evaluate a started job as a child run of its sweep's parent.

    Skips the setting when a FINISHED run with the same configuration hash exists
    (``sweep.resume``); logs the cache counters of this job as ``cache.*`` metrics. A job that
    claimed its sweep group evaluates the group in one pass, `members` being the other jobs'
    configs (none: they did not compose, and each job evaluates alone); otherwise, when the
    sweep varies a sharable key, the per-patch model outputs are kept in the cache for the
    settings that follow.
    """
    if start.outcome is not None:
        return start.outcome
    config, job, state = start.config, start.job, start.state
    cache = shared_cache(float(config.sweep.cache_mb))
    if start.claimed and state is not None:
        if members:
            return _in_group(config, job, complete, start.claimed[0].group, members, state, cache)
        grouping.release(job.sweep_dir, start.claimed[0].group)
    before = cache.counters()
    outcome = evaluate(
        config,
        job.output_dir,
        parent_run_id=state.parent_run_id if state else None,
        skip_finished=bool(config.sweep.resume),
        cache=cache,
        complete=complete,
        share_forward=start.share,
    )
    used = cache.counters() - before
    print(f"cache: {used.describe()}; {cache.nbytes / 2**20:.1f} MiB held")
    if outcome.run_id is not None and not outcome.skipped:
        client = tracking.prepare_store(tracking_uri_of(config.mlflow.tracking_uri))
        tracking.log_metrics(client, outcome.run_id, used.as_metrics())
    return outcome


def shares_forward(config: EvalConfig, swept_keys: tuple[str, ...]) -> bool:
    """Keep patch outputs for reuse: sharing on, a budget, and a sharable key swept."""
    sharable = [k for k in swept_keys if is_sharable(k)]
    return bool(config.sweep.share_forward and config.sweep.cache_mb > 0 and sharable)


def _named(
    config: EvalConfig, task_overrides: Sequence[str], num: int, state: SweepState | None
) -> EvalConfig:
    """`config` with its run named after its swept overrides (unless ``mlflow.run_name``)."""
    if state is None or config.mlflow.run_name is not None:
        return config
    name = setting_of(task_overrides, state.swept_keys, num)[0]
    return dataclasses.replace(config, mlflow=dataclasses.replace(config.mlflow, run_name=name))


def _in_group(
    config: EvalConfig,
    job: Job,
    complete: ConfigCompletion | None,
    group: str,
    members: Sequence[GroupMember],
    state: SweepState,
    cache: SweepCache,
) -> Outcome:
    """This job's outcome from its group's one pass (`sweep.group_pass`); every other member's
    outcome is written for its own job to return."""
    sweep_dir = job.sweep_dir
    specs = [Member(config, job.output_dir)]
    for member in members:
        named = _named(member.config, member.task_overrides, member.num, state)
        specs.append(Member(named, grouping.staged_dir(sweep_dir, member.num)))
    print(f"sweep group: evaluating {len(specs)} settings in one pass over the cases")
    outcomes: dict[int, Outcome] = {}
    try:
        with grouping.heartbeat(sweep_dir, group):
            results = evaluate_group(
                specs, cache, state.parent_run_id, bool(config.sweep.resume), complete
            )
        client = tracking.prepare_store(tracking_uri_of(config.mlflow.tracking_uri))
        nums = [job.num, *(m.num for m in members)]
        for num, result in zip(nums, results, strict=True):
            outcome = result.outcome
            print(f"cache: {result.cache_used.describe()} (job {num})")
            if outcome.run_id is not None and not outcome.skipped:
                tracking.log_metrics(client, outcome.run_id, result.cache_used.as_metrics())
            outcomes[num] = outcome
    finally:
        for member in members:  # every waiting job gets an answer, a failure too
            outcome = outcomes.get(member.num, Outcome(EXIT_ERROR, None))
            record = grouping.DoneRecord(
                outcome.code, outcome.run_id, outcome.skipped, outcome.case_ids, outcome.error
            )
            grouping.write_done(sweep_dir, member.num, record)
    return outcomes[job.num]

"""One job of a multirun: a child run of the sweep's parent that shares this process's cache."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from evalharness.config.schema import EvalConfig
from evalharness.evaluation.group import Member, evaluate_group
from evalharness.evaluation.run import (
    EXIT_ERROR,
    ConfigCompletion,
    Outcome,
    evaluate,
    tracking_uri_of,
)
from evalharness.evaluation.saved import uses_saved_predictions
from evalharness.sweep import groups
from evalharness.sweep.cache import SweepCache, shared_cache
from evalharness.sweep.groups import is_sharable
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


MemberBuilder = Callable[[Sequence[groups.PlannedJob]], Sequence[GroupMember]]
"""The other jobs of a group, as planned -> their configurations (none: they do not compose)."""


def evaluate_job(
    config: EvalConfig,
    job: Job,
    complete: ConfigCompletion | None = None,
    members: MemberBuilder = lambda planned: (),
) -> Outcome:
    """Evaluate `config` as job `job` of its sweep, named after its swept overrides.

    Skips the setting when a FINISHED run with the same configuration hash exists
    (``sweep.resume``); logs the cache counters of this job as ``cache.*`` metrics. With
    a sweep group (`sweep.groups`) and ``sweep.share_forward``, the group is evaluated in one
    pass by whichever of its jobs starts first, `members` building the other jobs' configs
    from their plans (called only there); otherwise, when the
    sweep varies a sharable key, the per-patch model outputs are kept in the cache for the
    settings that follow.
    """
    state = read_state(job.sweep_dir)
    config = _named(config, job.task_overrides, job.num, state)
    cache = shared_cache(float(config.sweep.cache_mb))
    share = shares_forward(config, state.swept_keys if state else ())
    others = groups.group_of(job.sweep_dir, job.num, job.task_overrides) if state else []
    if others and share and not uses_saved_predictions(config):
        outcome = _in_group(config, job, complete, others, members, state, cache)
        if outcome is not None:
            return outcome
    before = cache.counters()
    outcome = evaluate(
        config,
        job.output_dir,
        parent_run_id=state.parent_run_id if state else None,
        skip_finished=bool(config.sweep.resume),
        cache=cache,
        complete=complete,
        share_forward=share,
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
    others: Sequence[groups.PlannedJob],
    build_members: MemberBuilder,
    state: SweepState,
    cache: SweepCache,
) -> Outcome | None:
    """This job's outcome from its group's one pass (run here if this job claims the group,
    else written by the claimant); None when the claimant is gone: evaluate alone."""
    sweep_dir = job.sweep_dir
    group = others[0].group
    if not groups.try_claim(sweep_dir, group, job.num):
        record = groups.wait_for(sweep_dir, group, job.num)
        if record is None:
            return None
        groups.take_outputs(sweep_dir, job.num, job.output_dir)
        return Outcome(record.code, record.run_id, record.skipped, record.case_ids, record.error)
    members = build_members(others)
    if not members:  # the members' configs did not compose: each job evaluates alone
        groups.release(sweep_dir, group)
        return None
    specs = [Member(config, job.output_dir)]
    for member in members:
        named = _named(member.config, member.task_overrides, member.num, state)
        specs.append(Member(named, groups.staged_dir(sweep_dir, member.num)))
    print(f"sweep group: evaluating {len(specs)} settings in one pass over the cases")
    outcomes: dict[int, Outcome] = {}
    try:
        with groups.heartbeat(sweep_dir, group):
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
            record = groups.DoneRecord(
                outcome.code, outcome.run_id, outcome.skipped, outcome.case_ids, outcome.error
            )
            groups.write_done(sweep_dir, member.num, record)
    return outcomes[job.num]

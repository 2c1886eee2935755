"""A sweep group evaluated in one pass: each case read and run through the model once, then
blended, restored, post-processed and scored by every setting of the group.

The settings of a group differ only in what happens after the forward passes (aggregation,
keep-largest, threshold, restoration, test-time flips, metric options), so they share the
model, the preprocessing and the patch grid. Each setting keeps its own run, opened and closed
exactly as a single evaluation (`evaluation.run`): parameters, tags, resume, per-case table,
figures, predictions, cost. Only the loop over the cases is shared (`case_loop.loop_lanes`):
the first setting to reach a case runs its forward passes and leaves the patch outputs in the
sweep cache (`sweep.cache`), the others re-blend them.

Memory: the patch outputs of one case (per mirror flip; about 8 times its probability volume
at an overlap of half the patch) and the inputs of the current and the next case, within
``sweep.cache_mb``; plus what each setting keeps for its figures (its best and worst case and
the planes of its gallery). A case whose patch outputs do not fit the budget is run through
the model once per setting: results are the same, only the sharing is lost.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from evalharness.checks.mismatches import Mismatch
from evalharness.config.schema import EvalConfig
from evalharness.config.settings import stable_hash
from evalharness.data.datasets import Case
from evalharness.evaluation.case_loop import CaseStep, Extremes, Lane, case_step, loop_lanes
from evalharness.evaluation.lifecycle import (
    EXIT_ERROR,
    LazyRun,
    Outcome,
    close_run,
    guarded,
    store_error,
    tracking_uri_of,
)
from evalharness.evaluation.run import (
    ConfigCompletion,
    Opened,
    close_evaluation,
    complete_config,
    open_evaluation,
    outputs_for_sweep,
    run_model_cases,
)
from evalharness.predict.memory import reset_peak_memory
from evalharness.predict.patch_outputs import ForwardCounts
from evalharness.predict.pipeline import CaseInputs, preprocess_settings
from evalharness.sweep.cache import Counters, SweepCache
from evalharness.track import tracking


@dataclass(frozen=True)
class Member:
    """One setting of a group: its configuration and the folder of its outputs."""

    config: EvalConfig
    output_dir: Path


@dataclass(frozen=True)
class MemberResult:
    """How a member ended, and what it took from the sweep cache."""

    outcome: Outcome
    cache_used: Counters


def evaluate_group(
    members: Sequence[Member],
    cache: SweepCache,
    parent_run_id: str | None = None,
    skip_finished: bool = False,
    complete: ConfigCompletion | None = None,
) -> list[MemberResult]:
    """Evaluate every member, the cases looped over once (module doc); one result per member,
    in order. A member that fails to open or stops on a failed case fails alone; an unexpected
    error ends every member's run (FAILED; KILLED on Ctrl-C) and propagates."""
    first = members[0].config.mlflow
    uri = tracking_uri_of(first.tracking_uri)
    try:
        client, experiment = tracking.open_experiment(uri, first.experiment)
    except Exception as error:  # the store itself is unusable: there is no run to mark
        print(f"error: {store_error(uri, error)}", file=sys.stderr)
        return [MemberResult(Outcome(EXIT_ERROR, None), Counters()) for _ in members]
    runs = [LazyRun(client, experiment, m.config.mlflow.run_name, parent_run_id) for m in members]
    results: list[Outcome | Opened] = []
    opening: list[Counters] = []
    for member, run in zip(members, runs, strict=True):
        before = cache.counters()
        results.append(guarded(run, _opener(member, run, uri, skip_finished, cache, complete)))
        opening.append(cache.counters() - before)
    opened = [r for r in results if isinstance(r, Opened)]
    try:
        done = _run_together(opened, cache)
    except BaseException as error:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        for member in opened:
            close_run(member.run, status, f"sweep group: {error!r}")
        raise
    finished = []
    for result, used in zip(results, opening, strict=True):
        if isinstance(result, Outcome):
            finished.append(MemberResult(result, used))
            continue
        extremes, lane_used = done[id(result)]
        outcome = guarded(result.run, lambda r=result, e=extremes: _close(r, e))
        finished.append(MemberResult(outcome, used + lane_used))
    return finished


def _opener(
    member: Member,
    run: LazyRun,
    uri: str,
    skip_finished: bool,
    cache: SweepCache,
    complete: ConfigCompletion | None,
) -> Callable[[], Opened | Outcome]:
    def open_member() -> Opened | Outcome:
        config = complete_config(member.config, uri, complete)
        return open_evaluation(config, uri, member.output_dir, run, skip_finished, cache)

    return open_member


def _close(opened: Opened, extremes: Extremes | Exception) -> Outcome:
    if isinstance(extremes, Exception):
        raise extremes  # the case that stopped this member (run.on_case_error=stop)
    return close_evaluation(opened, extremes)


def _run_together(
    opened: Sequence[Opened], cache: SweepCache
) -> dict[int, tuple[Extremes | Exception, Counters]]:
    """The cases of the opened members, one pass per preprocessing (all of a sweep group share
    one); per member (by id): its extremes, or the `CaseError` that stopped it, and its cache
    use. Scoring saved predictions runs no model: such a member runs on its own."""
    results: dict[int, tuple[Extremes | Exception, Counters]] = {}
    passes: dict[str, list[Opened]] = {}
    for member in opened:
        if member.saved:
            before = cache.counters()
            extremes = run_model_cases(member, cache, None)
            results[id(member)] = (extremes, cache.counters() - before)
            continue
        pre = dataclasses.asdict(preprocess_settings(member.ev.settings))
        family = member.ev.family
        inputs = None if family is None else (family.name, family.inputs_key())
        passes.setdefault(stable_hash({"pre": pre, "family": inputs}), []).append(member)
    for members in passes.values():
        results.update(_one_pass(members, cache))
    return results


def _one_pass(
    members: Sequence[Opened], cache: SweepCache
) -> dict[int, tuple[Extremes | Exception, Counters]]:
    """One loop over the cases for `members` (same preprocessing), a lane each."""
    pre = preprocess_settings(members[0].ev.settings)
    lanes, extremes_of, used = [], [], [Counters() for _ in members]
    for index, member in enumerate(members):
        reset_peak_memory(member.ev.device)
        outputs_for = outputs_for_sweep(member.config, member.ev, cache)
        step, extremes = case_step(member.ev, member.sink, member.options, outputs_for)
        todo = {c.case_id for c in member.ev.dataset.cases} - member.options.skip_cases
        lanes.append(
            Lane(
                todo,
                list(member.ev.labels),
                member.table,
                member.sink,
                member.options,
                _tallied(step, cache, used, index),
                member.counts,
            )
        )
        extremes_of.append(extremes)
    loads: dict[str, Counters] = {}

    def load(case: Case) -> CaseInputs:
        before = cache.counters()  # only this thread loads cases: the difference is this one's
        try:
            return cache.load_inputs(case, pre, members[0].ev.family)
        finally:
            loads[case.case_id] = _case_part(cache.counters() - before)

    cases = _union_of_cases([m.ev.dataset.cases for m in members])
    loop_lanes(cases, lanes, load, members[0].options.prefetch)
    for case_id, counted in loads.items():
        needing = [i for i, lane in enumerate(lanes) if case_id in lane.case_ids]
        for rank, index in enumerate(needing):
            used[index] += counted if rank == 0 else Counters(case_hits=1)
    return {
        id(member): (lane.stopped if lane.stopped is not None else extremes, member_used)
        for member, lane, extremes, member_used in zip(
            members, lanes, extremes_of, used, strict=True
        )
    }


def _tallied(step: CaseStep, cache: SweepCache, used: list[Counters], index: int) -> CaseStep:
    """`step`, adding the patch outputs it stored and reused to ``used[index]``."""

    def counted(inputs: CaseInputs, counts: ForwardCounts) -> tuple[list[dict], list[Mismatch]]:
        before = cache.counters()
        try:
            return step(inputs, counts)
        finally:
            delta = cache.counters() - before
            used[index] += Counters(patch_stores=delta.patch_stores, patch_hits=delta.patch_hits)

    return counted


def _case_part(counters: Counters) -> Counters:
    return Counters(case_loads=counters.case_loads, case_hits=counters.case_hits)


def _union_of_cases(case_lists: Sequence[Sequence[Case]]) -> list[Case]:
    """Every case of the members, each once, in the first member's order."""
    seen: dict[str, Case] = {}
    for cases in case_lists:
        for case in cases:
            seen.setdefault(case.case_id, case)
    return list(seen.values())

"""The evaluation shell: one MLflow run per configuration, resumable, never left RUNNING.

Order of work: plan (model file, training config, settings, cases: the configuration hash) →
look for earlier runs of the same hash (skip a finished one in a sweep, before the model is
loaded; resume the finished cases of a killed or failed one) → prepare (load the model, probe
its channels) → create the run → config checks → cases → results. A failure before the run
exists (the configuration cannot start) is one line and creates no run; any later failure
marks the run FAILED with the reason as the tag `evalharness.error`, and keeps every case
already written.
Scoring saved predictions (`predictions.*`, `evaluation.saved`) takes the same path with a
model-free plan and no prepare step.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from evalharness.checks.mismatches import (
    REPORT_ARTIFACT,
    Mismatch,
    format_table,
    report_json,
    report_tags,
)
from evalharness.config.rules import MODEL_LOADING_OPTIONS
from evalharness.config.schema import EvalConfig, as_dict
from evalharness.config.settings import stable_hash
from evalharness.config.validate import validate
from evalharness.errors import ConfigError
from evalharness.evaluation.case_loop import Extremes, LoopOptions, OutputsFor, Reuse, run_cases
from evalharness.evaluation.lifecycle import (
    EXIT_CASES_FAILED,
    EXIT_ERROR,
    EXIT_OK,
    LazyRun,
    Outcome,
    guarded,
    store_error,
    tracking_uri_of,
)
from evalharness.evaluation.nnunet_plan import is_nnunet, plan_nnunet, prepare_nnunet
from evalharness.evaluation.outputs import check_outputs_folder
from evalharness.evaluation.plan import Evaluation, model_label, plan, prepare, run_tags
from evalharness.evaluation.resume import resumable
from evalharness.evaluation.run_report import log_results, print_summary, run_context
from evalharness.evaluation.saved import (
    SavedPlan,
    plan_saved,
    run_saved_cases,
    saved_context,
    saved_tags,
    uses_saved_predictions,
)
from evalharness.predict.case_inputs import load_case_inputs
from evalharness.predict.memory import peak_memory_mb, reset_peak_memory
from evalharness.predict.patch_outputs import ForwardCounts, forward_key
from evalharness.score.table import CaseTable
from evalharness.track import tracking
from evalharness.track.datasets import cases_dataset, log_evaluation_dataset
from evalharness.track.reuse import finished_setting

log = logging.getLogger(__name__)
ConfigCompletion = Callable[[EvalConfig, str], EvalConfig]
"""(validated config, evaluation store URI) -> the config to evaluate."""


def evaluate(
    config: EvalConfig,
    output_dir: Path,
    parent_run_id: str | None = None,
    skip_finished: bool = False,
    cache: Reuse | None = None,
    complete: ConfigCompletion | None = None,
    share_forward: bool = False,
    setting: str = "",
) -> Outcome:
    """Evaluate one configuration. Exit code 0 ok, 1 error, 2 some cases failed.

    The run is named `config.mlflow.run_name`, else after its model and `setting` (the values
    set on the command line, ``overlap=0.25``).

    `cache` shares the loaded model and preprocessed cases with the other jobs of a sweep;
    with `share_forward` also the per-patch model outputs (settings differing only after the
    forward passes reuse them).
    `complete`, given by a client such as the demo, fills in the configuration once it has
    been validated and the store is known (the demo builds its training run there).
    """
    uri = tracking_uri_of(config.mlflow.tracking_uri)
    try:
        client, experiment = tracking.open_experiment(uri, config.mlflow.experiment)
    except Exception as error:  # the store itself is unusable: there is no run to mark
        print(f"error: {store_error(uri, error)}", file=sys.stderr)
        return Outcome(EXIT_ERROR, None)
    run = LazyRun(client, experiment, config.mlflow.run_name, parent_run_id, setting)

    def whole() -> Outcome:
        completed = complete_config(config, uri, complete)
        opened = open_evaluation(completed, uri, output_dir, run, skip_finished, cache)
        if isinstance(opened, Outcome):
            return opened
        outputs_for = outputs_for_sweep(completed, opened.ev, cache) if share_forward else None
        return close_evaluation(opened, run_model_cases(opened, cache, outputs_for))

    return guarded(run, whole)


def complete_config(config: EvalConfig, uri: str, complete: ConfigCompletion | None) -> EvalConfig:
    """`config` filled in by the client's completion hook (validated first), if any."""
    if complete is None:
        return config
    validate(config)
    return complete(config, uri)


@dataclass(eq=False)
class Opened:
    """An evaluation set up to run its cases: its run, plan, table, sink and loop options."""

    config: EvalConfig
    uri: str
    output_dir: Path
    run: LazyRun
    ev: Evaluation | SavedPlan
    cases_name: str
    table: CaseTable
    sink: _MlflowSink
    options: LoopOptions
    counts: ForwardCounts = field(default_factory=ForwardCounts)

    @property
    def saved(self) -> bool:
        """Scoring saved predictions (no model)."""
        return isinstance(self.ev, SavedPlan)


def open_evaluation(
    config: EvalConfig,
    uri: str,
    output_dir: Path,
    run: LazyRun,
    skip_finished: bool,
    cache: Reuse | None,
) -> Opened | Outcome:
    """Plan, skip a finished setting (`skip_finished`: its outcome), prepare, create the run
    and log its parameters, tags, configuration, dataset and config-level findings."""
    check_outputs_folder(output_dir, "hydra.runtime.output_dir")
    run.output_dir = output_dir
    saved = uses_saved_predictions(config)
    if saved:
        planned = plan_saved(config, uri, output_dir / "saved_predictions")
    else:
        planned = plan_nnunet(config, uri) if is_nnunet(config) else plan(config, uri)
    run.case_ids = tuple(c.case_id for c in planned.dataset.cases)
    client = run.client
    earlier = tracking.runs_with_tag(
        client, run.experiment_id, "evalharness.config_hash", planned.config_hash
    )
    finished = [r for r in earlier if r.info.status == "FINISHED"]
    if skip_finished and finished:
        scratch = output_dir / "reused"
        done = finished_setting(client, finished, run.experiment_id, run.name, run.tags, scratch)
        return Outcome(EXIT_OK, done, skipped=True, case_ids=run.case_ids)
    if saved:
        ev: Evaluation | SavedPlan = planned
        params, tags = tracking.flatten(as_dict(config)), saved_tags(planned)
        if planned.not_applicable:
            print(
                "note: not applicable without a model (scoring saved predictions): "
                + ", ".join(planned.not_applicable),
                file=sys.stderr,
            )
    else:
        if is_nnunet(config):
            ev = prepare_nnunet(config, planned)
        else:
            ev = prepare(config, planned, cache.load_model) if cache else prepare(config, planned)
        params, tags = run_params(config, ev), run_tags(config, ev)
    if run.name is None:
        label = f"predictions {ev.folder.name}" if saved else model_label(planned.members)
        run.name = " ".join(filter(None, (label, run.setting)))
    previous_rows, previous_findings, resumed_from = (None, [], None)
    if config.run.resume:
        previous_rows, previous_findings, resumed_from = resumable(client, earlier, output_dir)
    run_id = run.ensure()
    if resumed_from:
        tags["evalharness.resumed_from"] = resumed_from
    tracking.log_params(client, run_id, params)
    tracking.set_tags(client, run_id, tags)
    tracking.log_text(client, run_id, config_yaml(config), "config.yaml")
    data = config.data
    cases = cases_dataset(ev.dataset, data.name, data.task, data.split.value)
    log_evaluation_dataset(client, run_id, cases)
    sink = _MlflowSink(client, run_id, ev)
    _check_config(config.checks.on_mismatch, ev, sink)
    if previous_findings:
        sink.findings(previous_findings)
    table = CaseTable(output_dir / "per_case.csv", previous_rows)
    run.table_path = table.csv_path
    options = LoopOptions(
        on_case_error=config.run.on_case_error,
        prefetch=config.run.prefetch,
        warn=config.checks.on_mismatch != "ignore",
        predictions_dir=(
            output_dir / "predictions" if config.output.save_predictions and not saved else None
        ),
        skip_cases=table.case_ids(),
        max_device_memory_mb=config.inference.max_device_memory_mb,
        gallery_k=config.output.gallery_k,
        metrics=config.metrics,
    )
    if options.skip_cases:
        print(f"resuming run {resumed_from}: {len(options.skip_cases)} case(s) already done")
    return Opened(config, uri, output_dir, run, ev, cases.name, table, sink, options)


def run_model_cases(
    opened: Opened, cache: Reuse | None, outputs_for: OutputsFor | None
) -> Extremes:
    """The cases of one opened evaluation, on its own (a sweep group: `sweep.group_pass`)."""
    if opened.saved:
        return run_saved_cases(opened.ev, opened.table, opened.sink, opened.options)
    reset_peak_memory(opened.ev.device)
    family = opened.ev.family
    if cache is not None:
        load = functools.partial(cache.load_inputs, family=family)
    else:
        load = family.load_inputs if family is not None else load_case_inputs
    return run_cases(
        opened.ev,
        opened.table,
        opened.sink,
        opened.options,
        load,
        outputs_for,
        opened.counts,
    )


def close_evaluation(opened: Opened, extremes: Extremes) -> Outcome:
    """Log the results and the cost, finish the run FINISHED, print the summary."""
    config, ev, saved, run = opened.config, opened.ev, opened.saved, opened.run
    client, run_id, table = run.client, run.ensure(), opened.table
    frame = table.frame()
    plot_dir = opened.output_dir / "plots" if config.output.plots else None
    page = saved_context if saved else run_context
    context = page(ev, opened.cases_name)
    summary = log_results(
        client, run_id, frame, table.csv_path, plot_dir, extremes, context, opened.options.metrics
    )
    device = ev.device if not saved else torch.device("cpu")
    counts = opened.counts
    cost = {**counts.as_metrics(), "peak_device_memory_mb": peak_memory_mb(device)}
    tracking.log_metrics(client, run_id, cost)
    print(f"forward passes: {counts.executed} executed, {counts.reused} reused")
    tracking.finish(client, run_id, "FINISHED")
    quiet = config.checks.on_mismatch == "ignore" or (saved and not ev.findings)
    shown = None if quiet else ev.findings  # saved: no training configuration to agree with
    print_summary(frame, summary, run_id, opened.uri, shown, run.experiment_id, opened.output_dir)
    code = EXIT_CASES_FAILED if summary["n_failed_cases"] else EXIT_OK
    return Outcome(code, run_id, case_ids=run.case_ids)


def outputs_for_sweep(config: EvalConfig, ev: Evaluation, cache: Reuse | None) -> OutputsFor | None:
    """The case -> patch-output store of this setting's forward key in the sweep cache."""
    if cache is None:
        return None
    options = {k: getattr(config.model, k) for k in MODEL_LOADING_OPTIONS}
    shas = [member.sha256 for member in (ev.members or (ev.resolved,))]  # every ensemble member
    model_key = stable_hash({"sha256": shas, "options": options})
    if ev.family is not None:
        key = ev.family.forward_key(model_key)
    else:
        key = forward_key(model_key, ev.settings, ev.device)
    return lambda case, pre: cache.patch_outputs(case, pre, key)


class _MlflowSink:
    """Mirrors the case loop to the run: the table after each case, findings, predictions."""

    def __init__(self, client: Any, run_id: str, ev: Evaluation | SavedPlan) -> None:
        self.client, self.run_id, self.ev = client, run_id, ev

    def case_done(self, table: CaseTable) -> None:
        tracking.log_file(self.client, self.run_id, table.csv_path)

    def findings(self, findings: list[Mismatch]) -> None:
        self.ev.findings.extend(findings)
        self.log_findings()

    def prediction_saved(self, path: Path) -> None:
        tracking.log_file(self.client, self.run_id, path, "predictions")

    def log_findings(self) -> None:
        report = report_json(self.ev.findings)
        text = json.dumps(report, indent=2)
        tracking.log_text(self.client, self.run_id, text, REPORT_ARTIFACT)
        tracking.set_tags(self.client, self.run_id, report_tags(report))


def _check_config(policy: str, ev: Evaluation | SavedPlan, sink: _MlflowSink) -> None:
    """Show config-level mismatches; with checks.on_mismatch=error stop before inference."""
    if ev.findings and policy != "ignore":
        table = format_table(ev.findings, color=sys.stderr.isatty())
        print(f"Evaluation settings vs the training configuration:\n{table}", file=sys.stderr)
    sink.log_findings()
    errors = list(dict.fromkeys(m.key for m in ev.findings if m.severity == "error"))
    if errors and policy == "error":
        raise ConfigError(
            f"preprocessing mismatch with the training configuration ({', '.join(errors)}); "
            f"see {REPORT_ARTIFACT} (checks.on_mismatch=error)"
        )


def run_params(config: EvalConfig, ev: Evaluation) -> dict[str, Any]:
    """The flattened configuration plus the `effective.*` values."""
    params = tracking.flatten(as_dict(config))
    params.update({f"effective.{k}": v for k, v in ev.settings.as_params().items()})
    return params


def config_yaml(config: EvalConfig) -> str:
    """The configuration as YAML (the ``config.yaml`` artifact), in the composed order."""
    return yaml.safe_dump(as_dict(config), default_flow_style=False, sort_keys=False)

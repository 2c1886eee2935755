"""The shell: Hydra's entry point and the only code that reads Hydra's composed config.

It registers the schema with Hydra, turns the composed config into the frozen dataclasses of
`config.schema` and hands them down: to `evaluation.run.evaluate` for one run, to
`sweep.jobs.start_job`, then `sweep.jobs.evaluate_job` for a job of a multirun (whose parent run
the Hydra callback `sweep.callback.SweepCallback` owns; a job that claims its sweep group gets
the other members' configs composed here, the only place that reads Hydra's config). With
``data=demo`` it lets the demo build its dataset and training run first (`with_demo`), so the
demo is evaluated like any user's run.
"""

from __future__ import annotations

import copy
import dataclasses
import signal
import sys
import typing
from collections.abc import Sequence
from dataclasses import MISSING as NO_VALUE
from pathlib import Path
from typing import Any

import hydra
from hydra._internal.utils import get_args_parser
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from evalharness.config.schema import GROUPS, EvalConfig, from_mapping
from evalharness.demo.build import ensure_demo
from evalharness.demo.spec import DEMO, TINY
from evalharness.errors import ConfigError, Stopped, stop_on_sigterm
from evalharness.evaluation.lifecycle import Outcome, record_failure
from evalharness.evaluation.outputs import check_outputs_folder
from evalharness.evaluation.run import evaluate
from evalharness.sweep.grouping import PlannedJob
from evalharness.sweep.jobs import GroupMember, Job, evaluate_job, start_job
from evalharness.sweep.state import setting_of

_HYDRA_SCHEMAS: dict[type, type] = {}


def hydra_schema(cls: type) -> type:
    """A mutable twin of the frozen dataclass `cls` (same name, fields and defaults) for
    Hydra to compose into; config groups with options in ``conf/`` are left MISSING."""
    if cls in _HYDRA_SCHEMAS:
        return _HYDRA_SCHEMAS[cls]
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            twin = hydra_schema(kind)
            default = MISSING if cls is EvalConfig and f.name in GROUPS else None
            spec = (
                dataclasses.field(default=default)
                if default is not None
                else dataclasses.field(default_factory=twin)
            )
            specs.append((f.name, twin, spec))
        elif f.default_factory is not NO_VALUE:
            specs.append((f.name, kind, dataclasses.field(default_factory=f.default_factory)))
        else:
            specs.append((f.name, kind, dataclasses.field(default=f.default)))
    twin = dataclasses.make_dataclass(cls.__name__, specs)
    # importable by reference (Hydra's launchers pickle the config store into their workers)
    twin.__module__, twin.__qualname__ = __name__, f"_Hydra{cls.__name__}"
    setattr(sys.modules[__name__], twin.__qualname__, twin)
    _HYDRA_SCHEMAS[cls] = twin
    return twin


def register_configs() -> None:
    """Register the schema and the typed base of every config group.

    The bases are stored at the top level (``data_schema``, not ``data/data_schema``), so that
    `--help` lists only the options a user can choose in each group; an option file includes
    its base with ``- /data_schema@_here_`` in its defaults list.
    """
    store = ConfigStore.instance()
    store.store(name="eval_schema", node=hydra_schema(EvalConfig))
    for group, node in GROUPS.items():
        store.store(name=f"{group}_schema", node=hydra_schema(node))


def config_from(cfg: DictConfig) -> EvalConfig:
    """The composed config (without its ``hydra`` node) as frozen, typed values."""
    task = {key: cfg[key] for key in cfg if key != "hydra"}  # Hydra's own node is not ours
    values = OmegaConf.to_container(OmegaConf.create(task), resolve=True)
    try:
        return from_mapping(EvalConfig, values)
    except TypeError as error:
        raise ConfigError(str(error)) from None


def with_demo(config: EvalConfig, tracking_uri: str) -> EvalConfig:
    """Build (or reuse) the demo's data and point `config` at it; and at the demo's training
    run unless `config` names a model or saved predictions (then the run is not touched)."""
    cache = Path(config.demo.cache_dir or Path.cwd() / "outputs" / "demo")
    model = config.model
    saved = config.predictions.dir or config.predictions.run_id  # scored without a model
    named = any(getattr(model, key) for key in ("run_id", "path", "uri", "run_name"))
    spec = TINY if config.demo.size == "tiny" else DEMO
    demo = ensure_demo(cache, tracking_uri, spec=spec, with_run=not (saved or named))
    split = config.data.split
    if split.method == "file" and split.file is None:
        split = dataclasses.replace(split, file=str(demo.split_file))
    data = dataclasses.replace(config.data, root=str(demo.data_root), split=split)
    if demo.run_id is not None:  # the demo's own model: nothing else was named
        model = dataclasses.replace(model, run_id=demo.run_id)
    return dataclasses.replace(config, data=data, model=model)


def _completion(config: EvalConfig) -> Any:
    return with_demo if config.data.name == "demo" else None


SETTING_GROUPS = ("preprocessing", "patch", "inference", "metrics")
"""Keys whose command-line values a single run's name shows (with its model)."""


def setting_name(task_overrides: Sequence[str]) -> str:
    """``overlap=0.25`` of the command line's ``patch.overlap=0.25`` (settings keys only)."""
    keys = [
        text.lstrip("+~").partition("=")[0]
        for text in task_overrides
        if text.lstrip("+~").split(".", 1)[0] in SETTING_GROUPS
    ]
    return setting_of(task_overrides, keys, 0)[0] if keys else ""


def evaluate_config(
    cfg: DictConfig, output_dir: Path, task_overrides: Sequence[str] = (), **options: Any
) -> Outcome:
    """Evaluate a composed config (what `main` does for one run; tests call it directly)."""
    config = config_from(cfg)
    setting = setting_name(task_overrides)
    return evaluate(config, output_dir, complete=_completion(config), setting=setting, **options)


def group_members(cfg: DictConfig, planned: Sequence[PlannedJob]) -> tuple[GroupMember, ...]:
    """The other jobs of a sweep group this job claimed (`sweep.grouping`), each configured as
    Hydra would compose it: this job's config `cfg` with the job's overrides of sharable keys
    applied (typed and checked by the schema); none when one of them does not apply."""
    members = []
    parser = OverridesParser.create()
    for other in planned:
        member = copy.deepcopy(cfg)
        try:
            with open_dict(member):
                for override in parser.parse_overrides(list(other.shared)):
                    OmegaConf.update(member, override.key_or_group, override.value(), merge=False)
            config = config_from(member)
        except Exception:  # noqa: BLE001 - that job composes (and reports) on its own
            return ()
        members.append(GroupMember(other.num, config, other.overrides))
    return tuple(members)


def unparsable_override(argv: Sequence[str]) -> str | None:
    """One line for the first command-line override Hydra's grammar cannot parse (a value
    with ``(``, ``ü``, ... unquoted), naming it, where and how to quote it; None if all parse."""
    try:
        overrides = get_args_parser().parse_known_args(list(argv))[0].overrides or []
    except SystemExit:  # an argument error: Hydra reports it itself
        return None
    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException as error:
            lines = str(error).splitlines()
            reason = lines[0]
            if reason.startswith("LexerNoViableAltException") and len(lines) > 1:
                column = lines[1].find("^") - len("LexerNoViableAltException: ")
                if 0 <= column < len(override):
                    reason = f"unexpected character {override[column]!r} at column {column + 1}"
            key, _, value = override.partition("=")
            return (
                f"{override}: Hydra cannot parse this override ({reason}); quote the value: "
                f"'{key}=\"{value}\"'"
            )
    return None


class OutputsCheck(Callback):
    """Hydra callback: stop before Hydra creates an outputs folder it cannot create."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_or_exit(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_or_exit(config, "hydra.sweep.dir")


def _check_or_exit(config: DictConfig, key: str) -> None:
    try:
        check_outputs_folder(Path(str(OmegaConf.select(config, key))), key)
    except ConfigError as error:
        sys.exit(record_failure(error).code)


register_configs()


def main() -> None:
    """The command: Hydra's entry point, with SIGTERM and SIGHUP unwinding like Ctrl-C. Each
    closes the open runs KILLED (on their way out), prints one line, and exits 128 + the
    signal's number (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP); the same command then resumes."""
    stop_on_sigterm()
    unparsable = unparsable_override(sys.argv[1:])
    if unparsable is not None:
        print(f"error: {unparsable}", file=sys.stderr)
        sys.exit(1)
    try:
        hydra_main()
    except KeyboardInterrupt as stop:
        name, signum = (
            (stop.name, stop.signum) if isinstance(stop, Stopped) else ("Ctrl-C", signal.SIGINT)
        )
        print(
            f"stopped by {name}: any run in progress was closed as KILLED; the same command "
            "resumes it",
            file=sys.stderr,
        )
        sys.exit(128 + signum)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def hydra_main(cfg: DictConfig) -> Any:
    """Evaluate one configuration; in a sweep, return the outcome to the sweep callback."""
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    try:  # a key the schema lacks (``+patch.sise=64``): one line, like any unknown key
        config = config_from(cfg)
    except ConfigError as error:
        outcome = record_failure(error)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return outcome
        sys.exit(outcome.code)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        job = Job(
            sweep_dir=Path(hydra_cfg.sweep.dir).absolute(),
            output_dir=output_dir,
            task_overrides=tuple(hydra_cfg.overrides.task),
            num=int(hydra_cfg.job.num),
        )
        start = start_job(config, job)
        members = group_members(cfg, start.claimed) if start.claimed else ()
        return evaluate_job(start, _completion(config), members)
    code = evaluate_config(cfg, output_dir, tuple(hydra_cfg.overrides.task)).code
    if code:
        sys.exit(code)
    return code

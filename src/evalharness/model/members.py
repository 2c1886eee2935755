"""The members of an ensemble: one model config per listed model, and their training
configurations, which must agree on everything that shapes preprocessing or decoding.

`model.run_id`, `model.uri` and `model.path` may each list several models (only one of them
at a time); every member is then an ordinary single-model `ModelConfig`, resolved and loaded
like one. A one-element list is the same model config as its element. Averaging the members'
probabilities is `predict.ensemble`'s job.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from evalharness.config.rules import MODEL_MEMBER_KEYS, model_sources
from evalharness.config.schema import ModelConfig
from evalharness.config.settings import FROM_TRAINING
from evalharness.config.values import format_value, normalize_spec
from evalharness.errors import ConfigError
from evalharness.model.sources import ResolvedModel
from evalharness.model.training_config import TrainingConfig

AGREED_FIELDS: tuple[str, ...] = tuple(s.training for s in FROM_TRAINING if s.training)
"""Training fields the members must agree on: every setting a training configuration provides
(`config.settings.FROM_TRAINING`: reorientation, spacing, normalisation, padding, patch size
and overlap, aggregation, keep-largest, threshold), plus the output contract."""
SPACING_RTOL = 1e-3  # as the config checks compare spacings


def member_configs(model: ModelConfig) -> tuple[ModelConfig, ...]:
    """One single-model config per member (a one-element list becomes its element)."""
    values = {key: model_sources(f"model.{key}", getattr(model, key)) for key in MODEL_MEMBER_KEYS}
    single = {key: v[0] if len(v) == 1 else None for key, v in values.items() if len(v) <= 1}
    base = dataclasses.replace(model, **single)
    listed = [key for key, v in values.items() if len(v) > 1]
    if not listed:
        return (base,)
    key = listed[0]
    return tuple(dataclasses.replace(base, **{key: value}) for value in values[key])


def member_name(resolved: ResolvedModel) -> str:
    """How an error names a member: its training run, else its file."""
    if resolved.training_run_id:
        return f"run {resolved.training_run_id}"
    return f"file {resolved.local_path}"


def _comparable(name: str, value: Any) -> Any:
    if name == "normalization":
        return [normalize_spec(spec) for spec in value or []]
    return value


def _same(name: str, a: Any, b: Any) -> bool:
    a, b = _comparable(name, a), _comparable(name, b)
    if name == "target_spacing" and a is not None and b is not None and len(a) == len(b):
        return all(math.isclose(x, y, rel_tol=SPACING_RTOL) for x, y in zip(a, b, strict=True))
    return a == b


def check_agreement(members: Sequence[ResolvedModel]) -> None:
    """`ConfigError` naming the first training field (or the output contract) on which two
    members' training configurations disagree. A field only some members record is not a
    disagreement: the ensemble takes it from those that do (`agreed_training_config`)."""
    families = [m for m in members if m.family is not None]
    if len(members) > 1 and families:
        raise ConfigError(
            f"model: {member_name(families[0])} is a MONAI bundle, which cannot be an ensemble "
            "member; expected one bundle, or model files only"
        )
    for index, later in enumerate(members[1:], start=1):
        for earlier in members[:index]:
            a, b = earlier.training_config, later.training_config
            for name in AGREED_FIELDS:
                both = name in a.values and name in b.values
                if both and not _same(name, a.values[name], b.values[name]):
                    _disagree(name, a.values[name], b.values[name], earlier, later)
            if a.output is not None and b.output is not None and a.output != b.output:
                _disagree("output contract", a.output, b.output, earlier, later)


def _disagree(name: str, a: Any, b: Any, first: ResolvedModel, second: ResolvedModel) -> None:
    raise ConfigError(
        f"model: the ensemble's members disagree on the training config's {name}: "
        f"{format_value(a)} ({member_name(first)}) vs {format_value(b)} ({member_name(second)}); "
        "expected members trained with the same preprocessing and decoding"
    )


def agreed_training_config(members: Sequence[ResolvedModel]) -> TrainingConfig:
    """The ensemble's training configuration: each field from the first member recording it
    (after `check_agreement` they agree), the first output contract found; a single member's
    own configuration unchanged."""
    configs = [m.training_config for m in members]
    if len(configs) == 1:
        return configs[0]
    values: dict[str, Any] = {}
    unknown: dict[str, Any] = {}
    field_sources: dict[str, str] = {}
    for config in reversed(configs):  # the first member's values win
        values.update(config.values)
        unknown.update(config.unknown)
        field_sources.update({name: config.source_of(name) for name in config.values})
    sources = list(dict.fromkeys(c.source for c in configs))
    output = next((c.output for c in configs if c.output is not None), None)
    transforms = next((c.transforms for c in configs if c.transforms), ())
    return TrainingConfig(
        values=values,
        source="+".join(sources),
        unknown=unknown,
        output=output,
        field_sources=field_sources,
        transforms=transforms,
    )

"""The parts of a MONAI bundle config the evaluation needs, closed and checked before anything
of it is instantiated.

A bundle config is a program: MONAI's `ConfigParser` evaluates every ``$`` string as Python
(``"$import glob"``, ``"$@network_def.to(@device)"``), resolves ``@id`` references to other
ids and instantiates any importable ``_target_``. `closed_config` reads only the ids the
evaluation needs, follows their ``@`` references and returns their raw content with every
reference inlined, so a fresh `ConfigParser` holding nothing else can instantiate them: ids the
evaluation does not need (datalist, dataset, dataloader, evaluator, handlers, ...) are never
parsed, evaluated or instantiated.

Untrusted (the default), it accepts only: literal values, ``@`` references to ids it then
checks the same way, and ``_target_``\\ s naming a *class* inside ``monai`` or ``torch``
(MONAI's short names such as ``"UNet"`` resolve through MONAI's own component table). A ``$``
expression, a ``_target_`` elsewhere (or naming a function, such as ``torch.save``), a
``_mode_`` other than the default, or a dotted name in a string argument (MONAI imports some,
e.g. ``LoadImage(reader=...)``) is a `SourceError` naming the id and the value. Trusted
(``model.trust_bundle=true``), nothing is checked and each ``$`` expression is evaluated by
the bundle's own parser, as ``monai.bundle run`` would.
"""

from __future__ import annotations

import copy
import inspect
import pydoc
import re
from collections.abc import Callable, Mapping
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator, ConfigComponent

from evalharness.errors import SourceError

REF, EXPR = "@", "$"
TARGET, MODE, REQUIRES = "_target_", "_mode_", "_requires_"
SEP = "::"
ALLOWED_PACKAGES = ("monai", "torch")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_LOCATOR = ComponentLocator()
SKIP = Callable[[str, Any], bool]


def _normal_id(ref: str) -> str:
    return ref.replace("#", SEP)


def _raw(parser: ConfigParser, config_id: str, where: str) -> Any:
    try:
        return parser[config_id]
    except (KeyError, IndexError, ValueError, TypeError):
        raise SourceError(f"{where}: id '{config_id}' not found in the bundle config") from None


def allowed_class(target: str) -> type | None:
    """The class a ``_target_`` names when it lies inside an allowed package, else None.

    Short names resolve through MONAI's component table (as `ConfigParser` does); only modules
    of ``monai`` and ``torch`` are ever imported here.
    """
    module = ComponentLocator.get_component_module_name(_LOCATOR, target)
    if isinstance(module, list):
        module = module[0]
    full = f"{module}.{target}" if module else target
    if full.split(".")[0] not in ALLOWED_PACKAGES:
        return None
    found = pydoc.locate(full)
    if not inspect.isclass(found) or found.__module__.split(".")[0] not in ALLOWED_PACKAGES:
        return None
    return found


def target_class(item: Mapping[str, Any]) -> str:
    """The full dotted name of a component's ``_target_`` (as MONAI resolves it)."""
    return ConfigComponent(config=dict(item), locator=_LOCATOR).resolve_module_name()


class _Closer:
    def __init__(self, parser: ConfigParser, trusted: bool, skip: SKIP) -> None:
        self.parser, self.trusted, self.skip = parser, trusted, skip

    def refuse(self, where: str, value: Any, why: str) -> None:
        raise SourceError(
            f"bundle id '{where}': {why}: {value!r} (the bundle's code does not run unless "
            "model.trust_bundle=true)"
        )

    def close(self, value: Any, where: str, seen: tuple[str, ...]) -> Any:
        if isinstance(value, Mapping):
            if self.skip(where, value):
                return value
            return self._mapping(value, where, seen)
        if isinstance(value, list):
            return [self.close(v, f"{where}{SEP}{i}", seen) for i, v in enumerate(value)]
        if isinstance(value, str):
            return self._string(value, where, seen)
        return value

    def _mapping(self, value: Mapping[str, Any], where: str, seen: tuple[str, ...]) -> dict:
        if not self.trusted:
            if MODE in value and value[MODE] != "default":
                self.refuse(f"{where}{SEP}{MODE}", value[MODE], "only the default _mode_ is read")
            target = value.get(TARGET)
            if target is not None and not (isinstance(target, str) and allowed_class(target)):
                self.refuse(
                    f"{where}{SEP}{TARGET}",
                    target,
                    f"a _target_ must name a class inside {' or '.join(ALLOWED_PACKAGES)}",
                )
        closed = {}
        for key, item in value.items():
            inner = f"{where}{SEP}{key}"
            if key == TARGET and isinstance(item, str):
                closed[key] = item  # checked above (a class name, never a reference)
            elif key == REQUIRES and not self.trusted:
                self.close(item, inner, seen)  # checked, then dropped: all of it is literal
            else:
                closed[key] = self.close(item, inner, seen)
        return closed

    def _string(self, value: str, where: str, seen: tuple[str, ...]) -> Any:
        if value.startswith(EXPR):
            if not self.trusted:
                self.refuse(where, value, "a $ expression is Python")
            try:
                return self.parser.get_parsed_content(where)
            except Exception as error:  # the bundle's own code failed
                raise SourceError(f"bundle id '{where}': {value!r} failed: {error}") from None
        if value.startswith(REF):
            ref = _normal_id(value[len(REF) :])
            if ref in seen:
                raise SourceError(f"bundle id '{where}': circular reference {value!r}")
            return self.close(copy.deepcopy(_raw(self.parser, ref, where)), ref, (*seen, ref))
        if (
            not self.trusted
            and _DOTTED.match(value)
            and value.split(".")[0] not in ALLOWED_PACKAGES
        ):
            self.refuse(where, value, "a dotted name outside monai and torch (MONAI may import it)")
        return value


def closed_config(
    parser: ConfigParser,
    config_id: str,
    *,
    trusted: bool = False,
    skip: SKIP = lambda where, value: False,
) -> Any:
    """The raw content of `config_id` with its references inlined, checked (module doc).

    `skip(where, mapping)` marks components the evaluation leaves alone (``SaveImaged``: the
    harness writes predictions itself): they are returned as they are, neither checked nor
    evaluated, and must never be instantiated. `parser` holds the bundle config with its
    macros and relative ids resolved; it is only read (and, when `trusted`, evaluates the
    ``$`` expressions met on the way).
    """
    raw = copy.deepcopy(_raw(parser, config_id, "bundle config"))
    return _Closer(parser, trusted, skip).close(raw, config_id, (config_id,))


def instantiate(closed: Any, config_id: str) -> Any:
    """Instantiate a closed config (`closed_config`) with a parser that holds nothing else."""
    try:
        return ConfigParser({config_id: closed}).get_parsed_content(config_id)
    except Exception as error:  # a constructor's own error
        raise SourceError(f"bundle id '{config_id}': cannot instantiate it: {error}") from None

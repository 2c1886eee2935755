"""Restricted unpickling of model files and training-side pickles.

A pickle can call any importable function while it loads, so ``torch.load(weights_only=False)``
on a downloaded ``best_learner.pkl`` runs whatever the file says. This module loads such files
through an unpickler whose ``find_class`` resolves only an allow-list of classes and functions:

* tensor/parameter rebuild functions, dtypes, devices and storages (what ``torch.save`` needs);
* ``torch.nn`` layer classes and ``monai.networks`` classes (resolved, then checked to be
  ``nn.Module`` subclasses defined there), einops' layers (MONAI's transformers use them) and
  MONAI's enums;
* inert data types: ``OrderedDict``, numpy values, ``pathlib`` paths, ``builtins`` containers;
* whatever the user lists in ``model.allow_globals`` (never anything on the deny-list).

Naming a global is not calling it: `pickle_calls` rules which callables the file may call
with its own arguments, and rebuilds classes without running their constructors.

Globals of the training stack (fastai, fastcore, fastMONAI, fastprogress, plum, cloudpickle,
MONAI's losses) become inert :class:`Placeholder` classes, so a fastai ``Learner`` export loads
without fastai as a placeholder whose ``.model`` is the real network. Any other global: refused.
"""

from __future__ import annotations

import _compat_pickle
import enum
import importlib
import importlib.util
import io
import os
import pathlib
import pickle
import types
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import torch

from evalharness.errors import HarnessError, SourceError, first_line
from evalharness.model.pickle_calls import GUARDED, GuardedUnpickler, Refused, names

# Plain data: enough for dicts of lists/floats/paths/numpy values, nothing executable.
# `_codecs.encode` (protocol-2 bytes) and the `copyreg` helpers resolve to the checked
# versions of `pickle_calls`.
_DATA_GLOBALS = names(
    """
    collections.OrderedDict _codecs.encode copyreg._reconstructor copyreg.__newobj__
    copyreg.__newobj_ex__
    builtins.set builtins.frozenset builtins.slice builtins.bytes builtins.bytearray
    builtins.complex builtins.object builtins.dict builtins.list builtins.tuple builtins.int
    builtins.float builtins.str builtins.bool builtins.range
    numpy.dtype numpy.ndarray numpy._core.multiarray.scalar numpy._core.multiarray._reconstruct
    pathlib.Path pathlib.PosixPath pathlib.WindowsPath
    pathlib.PurePath pathlib.PurePosixPath pathlib.PureWindowsPath
    """
)
# What torch.save writes for tensors and parameters (`_rebuild_from_type_v2` and
# `_rebuild_wrapper_subclass` resolve to the checked versions of `pickle_calls`).
_TORCH_GLOBALS = names(
    """
    torch._utils._rebuild_tensor torch._utils._rebuild_tensor_v2 torch._utils._rebuild_tensor_v3
    torch._utils._rebuild_parameter torch._utils._rebuild_parameter_with_state
    torch._utils._rebuild_qtensor torch._utils._rebuild_sparse_tensor
    torch._utils._rebuild_meta_tensor_no_storage torch._utils._rebuild_nested_tensor
    torch._utils._rebuild_wrapper_subclass torch._utils._rebuild_device_tensor_from_numpy
    torch._utils._rebuild_device_tensor_from_cpu_tensor torch._tensor._rebuild_from_type_v2
    torch.serialization._get_layout torch.nn.parameter.Parameter
    torch.Tensor torch.device torch.Size
    """
)
# Never resolved, not even through model.allow_globals: each one runs code, imports, touches
# files or processes, or reaches any other object (getattr).
_DENIED_EXACT = names(
    """
    builtins.eval builtins.exec builtins.compile builtins.getattr builtins.setattr
    builtins.delattr builtins.__import__ builtins.open builtins.breakpoint builtins.input
    builtins.globals builtins.locals builtins.vars torch.load torch.serialization.load
    """
)
_DENIED_PREFIXES = tuple(
    f"{module}."
    for module in names(
        """
        os posix nt subprocess sys importlib runpy shutil socket pickle _pickle marshal ctypes
        pty code torch.hub torch.jit torch.ops torch._C torch.utils.cpp_extension
        """
    )
)

# Training-side libraries: their globals become inert placeholders. MONAI's losses are here too:
# a loss is training state, and building it for real would need every global inside it
# (activations, weights, custom callables) on the allow-list for no benefit to inference.
_PLACEHOLDER_PREFIXES = (
    "fastai.",
    "fastcore.",
    "fastMONAI.",
    "fastprogress.",
    "plum.",
    "cloudpickle.",
    "monai.losses.",
)
# cloudpickle rebuilds classes as skeleton(type, name, bases, ...) and properties as
# property(fget, ...). The real `type` would build classes whose dunder methods are other
# unpickled objects (called later, e.g. by BUILD or garbage collection), and `type(obj)` hands
# out classes that are not on the allow-list; so these become placeholders, and only once the
# stream has used a cloudpickle global. Anywhere else they are refused.
_CLOUDPICKLE_BUILTINS = frozenset(
    {"builtins.type", "builtins.property", "builtins.classmethod", "builtins.staticmethod"}
)
_CLASS_FACTORIES = frozenset(
    {"cloudpickle.cloudpickle._make_skeleton_class", "cloudpickle.cloudpickle._make_skeleton_enum"}
)
_INERT_BUILTINS = frozenset({"builtins.print"})  # fastai keeps `logger=print`; keep it inert

_MODULE_ALIASES = {"numpy.core.multiarray": "numpy._core.multiarray"}


class Placeholder:
    """Inert stand-in for a global of the training stack (fastai ``Learner``, cloudpickle, ...).

    Construction, calls and ``__setstate__`` only record their arguments: the pickled state
    dict becomes attributes (so ``learner.model`` is the real network), positional arguments
    land in ``_placeholder_args``, list and dict items in ``_placeholder_items``.
    """

    __placeholder_for__: ClassVar[str] = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = object.__new__(cls)
        obj.__dict__["_placeholder_args"] = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Accept anything: the arguments were recorded by ``__new__``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:
        """A placeholder function called while unpickling returns a new placeholder."""
        return type(self)(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        parts = state if _is_slot_state(state) else (state,)
        for part in parts:
            if isinstance(part, dict):
                self.__dict__.update({str(k): v for k, v in part.items()})
            elif part is not None:
                self.__dict__["_placeholder_state"] = part

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("_placeholder_items", {})[key] = value

    def append(self, item: Any) -> None:
        """Record a list item (pickle's APPEND on list subclasses such as fastcore's ``L``)."""
        self.__dict__.setdefault("_placeholder_items", {})[len(self._items())] = item

    def extend(self, items: Any) -> None:
        """Record list items (pickle's APPENDS)."""
        for item in items:
            self.append(item)

    def _items(self) -> dict:
        return self.__dict__.get("_placeholder_items", {})

    def __repr__(self) -> str:
        return f"<placeholder for {self.__placeholder_for__}>"


def _is_slot_state(state: Any) -> bool:
    """pickle's ``(dict_state, slot_state)`` form."""
    return (
        isinstance(state, tuple)
        and len(state) == 2
        and all(part is None or isinstance(part, dict) for part in state)
    )


def is_placeholder(obj: Any) -> bool:
    """Whether ``obj`` is an inert placeholder made while unpickling."""
    return isinstance(obj, Placeholder)


def _placeholder_class(qualified: str) -> type[Placeholder]:
    name = qualified.rpartition(".")[2] or qualified
    return type(name, (Placeholder,), {"__placeholder_for__": qualified})


class _ClassFactory:
    """cloudpickle's skeleton-class makers: return a placeholder *class* (instances follow)."""

    def __init__(self, qualified: str) -> None:
        self.qualified = qualified

    def __call__(self, *args: Any, **kwargs: Any) -> type[Placeholder]:
        name = args[1] if len(args) > 1 and isinstance(args[1], str) else "class"
        return _placeholder_class(f"{self.qualified}:{name}")


def _canonical(module: str, name: str) -> tuple[str, str]:
    """Python-2 names (``__builtin__``, ``copy_reg``) and numpy<2 paths to today's names."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    alias = _MODULE_ALIASES.get(module)
    if alias is not None and importlib.util.find_spec(alias.rpartition(".")[0]) is not None:
        module = alias
    return module, name


def _resolve(module: str, name: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _is_module_class(obj: Any, prefix: str) -> bool:
    return (
        isinstance(obj, type)
        and issubclass(obj, torch.nn.Module)
        and obj.__module__.startswith(prefix)
    )


def _resolve_by_rule(module: str, name: str) -> Any:
    """Globals allowed by what they are (resolved inside trusted packages only), else None."""
    if module == "torch":
        obj = getattr(torch, name, None)
        typed = (torch.dtype, torch.layout, torch.memory_format, torch.qscheme)
        storage = (torch.storage.TypedStorage, torch.storage.UntypedStorage)
        if isinstance(obj, typed) or (isinstance(obj, type) and issubclass(obj, storage)):
            return obj
        return None
    rules = (
        ("torch.nn.", lambda o: _is_module_class(o, "torch.nn.")),
        ("monai.networks.", lambda o: _is_module_class(o, "monai.networks.")),
        # MONAI's transformer blocks (UNETR, ViT) hold einops' layer modules.
        ("einops.layers.torch", lambda o: _is_module_class(o, "einops.layers.")),
        ("monai.utils.enums", lambda o: isinstance(o, type) and issubclass(o, enum.Enum)),
    )
    for prefix, accepts in rules:
        if f"{module}.".startswith(prefix):
            try:
                obj = _resolve(module, name)
            except (ImportError, AttributeError):
                return None
            return obj if accepts(obj) else None
    return None


class _Policy:
    """Decides, per global, between the real object, a placeholder and refusal."""

    def __init__(self, *, model: bool, allow_globals: Sequence[str] = ()) -> None:
        for entry in allow_globals:
            if not isinstance(entry, str) or "." not in entry.strip("."):
                raise SourceError(
                    f"model.allow_globals: {entry!r} is not a fully qualified 'module.name'"
                )
        self.model = model
        self.allowed = _DATA_GLOBALS | (_TORCH_GLOBALS if model else frozenset())
        self.allowed |= frozenset(allow_globals)
        # A path of the other OS cannot be instantiated here: keep it as a pure path.
        self.substitutes: dict[str, Any] = (
            {"pathlib.PosixPath": pathlib.PurePosixPath}
            if os.name == "nt"
            else {"pathlib.WindowsPath": pathlib.PureWindowsPath}
        )
        if model:
            self.substitutes["torch.storage._load_from_bytes"] = self._load_from_bytes

    def _load_from_bytes(self, data: bytes) -> Any:
        """Tensors inside plain pickles: torch would fully unpickle these bytes; we do not."""
        return _load_stream(io.BytesIO(data), _pickle_module(self))

    def find(self, module: str, name: str, seen_cloudpickle: bool) -> Any:
        module, name = _canonical(module, name)
        qualified = f"{module}.{name}"
        if qualified in _DENIED_EXACT or qualified.startswith(_DENIED_PREFIXES):
            raise Refused(qualified, "denied")
        if qualified in GUARDED:
            return _resolve(module, name)  # swapped for its checked version by the unpickler
        if any(part.startswith("__") for part in name.split(".")):
            raise Refused(qualified, "not_allowed")
        if qualified in self.substitutes:
            return self.substitutes[qualified]
        if qualified in self.allowed:
            return _resolve(module, name)
        if self.model:
            obj = _resolve_by_rule(module, name)
            if obj is not None:
                return obj
            if qualified in _CLASS_FACTORIES:
                return _ClassFactory(qualified)
            if qualified.startswith(_PLACEHOLDER_PREFIXES) or qualified in _INERT_BUILTINS:
                return _placeholder_class(qualified)
            if seen_cloudpickle and qualified in _CLOUDPICKLE_BUILTINS:
                return _placeholder_class(qualified)
        raise Refused(qualified, "not_allowed")


def _pickle_module(policy: _Policy) -> types.ModuleType:
    """A module-like object for ``torch.load(pickle_module=...)`` bound to ``policy``."""

    substitutes = frozenset(id(f) for f in policy.substitutes.values())

    class RestrictedUnpickler(GuardedUnpickler):
        inert = (Placeholder, _ClassFactory)

        def __init__(self, file: BinaryIO, **kwargs: Any) -> None:
            super().__init__(file, **kwargs)
            self._seen_cloudpickle = False

        def resolve(self, module: str, name: str) -> Any:
            self._seen_cloudpickle |= module.startswith("cloudpickle")
            return policy.find(module, name, self._seen_cloudpickle)

        def extra_callables(self) -> frozenset[int]:
            return substitutes

    module = types.ModuleType("evalharness_restricted_pickle")
    module.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    module.load = lambda file, **kw: RestrictedUnpickler(file, **kw).load()  # type: ignore[attr-defined]
    module.__version__ = pickle.format_version  # type: ignore[attr-defined]
    return module


_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _load_stream(stream: BinaryIO, pickle_module: Any) -> Any:
    """Load a torch zip, a legacy ``torch.save`` stream or a plain pickle with ``pickle_module``."""
    start = stream.tell()
    is_zip = zipfile.is_zipfile(stream)
    stream.seek(start)
    if not is_zip:
        first = pickle_module.load(stream)
        if type(first) is not int or first != _TORCH_LEGACY_MAGIC:
            return first
        stream.seek(start)
    return torch.load(stream, map_location="cpu", weights_only=False, pickle_module=pickle_module)


def _load_file(path: Path, policy: _Policy | None) -> Any:
    module = pickle if policy is None else _pickle_module(policy)
    try:
        with open(path, "rb") as stream:
            return _load_stream(stream, module)
    except Refused as refused:
        raise SourceError(_refusal(path, refused, policy)) from None


def _refusal(path: Path, refused: Refused, policy: _Policy | None) -> str:
    if refused.kind == "call":
        return (
            f"{path}: refused to call '{refused.qualified}' with the file's arguments (classes "
            "are rebuilt from their saved state, never constructed while loading; only tensor "
            "and container rebuilders are called)"
        )
    if refused.kind == "denied":
        hint = "never allowed; use model.trust_pickle=true only if you trust the file"
    elif policy is not None and not policy.model:
        hint = "this file may hold plain data only"
    else:
        hint = "not on the allow-list; add it with model.allow_globals=[...] if you trust it"
    return f"{path}: refused to unpickle global '{refused.qualified}' ({hint})"


def load_model_pickle(
    path: Path, *, allow_globals: Sequence[str] = (), trust_pickle: bool = False
) -> Any:
    """Unpickle a model file (torch zip, legacy torch or plain pickle) with the allow-list.

    ``allow_globals`` adds fully qualified ``module.name`` entries for custom architectures.
    ``trust_pickle=True`` skips every check (plain ``torch.load(weights_only=False)``): the file
    can then run arbitrary code, so use it only for files you made yourself.
    """
    policy = None if trust_pickle else _Policy(model=True, allow_globals=allow_globals)
    return _load_file(Path(path), policy)


def load_data_pickle(path: Path) -> Any:
    """Unpickle plain data (dicts, lists, numbers, strings, numpy values, paths) only; a file
    that is no readable pickle (truncated, garbage) is a `SourceError` naming it."""
    try:
        return _load_file(Path(path), _Policy(model=False))
    except (HarnessError, OSError):
        raise
    except Exception as error:  # noqa: BLE001 - any parse failure of untrusted bytes
        detail = first_line(error) if str(error).strip() else "the data ends early"
        raise SourceError(
            f"{path}: not a readable pickle ({type(error).__name__}: {detail})"
        ) from error


__all__ = [
    "Placeholder",
    "is_placeholder",
    "load_data_pickle",
    "load_model_pickle",
]

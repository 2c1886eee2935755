"""What a pickle may *call* while it loads, enforced opcode by opcode.

The allow-list of `safe_pickle` says which globals a file may *name*. Naming a class is not
permission to *call* it with arguments from the file: a constructor can download a URL, write
a file or start anything (``monai.networks.nets.HoVerNet(..., pretrained_url)`` does). So:

* **Functions** the file may call with its own arguments are a small named set: the tensor,
  parameter and array rebuilders of torch and numpy (`RECONSTRUCTORS`), and checked versions of
  ``copyreg._reconstructor``, ``copyreg.__newobj__``, ``torch._tensor._rebuild_from_type_v2``,
  ``torch._utils._rebuild_wrapper_subclass`` and ``_codecs.encode`` (each of which would
  otherwise call an object the file hands it).
* **Classes are rebuilt, never constructed.** ``NEWOBJ`` (what ``torch.save(module)`` writes)
  and ``copyreg.__newobj__`` create the instance through ``object.__new__`` or a builtin value
  type's ``__new__``, so none of the class's own code runs; ``BUILD`` then hands it its saved
  state (its ``__setstate__``, or its ``__dict__``), as ``pickle`` rebuilds any object.
  ``copyreg._reconstructor`` is accepted only with ``object`` or a builtin value type as its
  base (otherwise it calls the base's ``__init__``). A class may be *called* (``REDUCE``,
  ``INST``, ``OBJ``) only when calling it builds a plain value and nothing else: the builtin
  containers and numbers, ``OrderedDict``, ``slice``, ``range``, ``torch.device``,
  ``torch.Size``, ``numpy.dtype``, ``pathlib`` paths (`VALUE_TYPES`), an enum (a lookup by
  value), and the inert placeholders of `safe_pickle`.
* ``BUILD``, ``APPEND(S)``, ``SETITEM(S)`` and ``ADDITEMS`` never act on a class, a function,
  a module, an enum member or any other global the file named: that would patch it for the
  whole process.

Everything else is refused with a `Refused` naming the callable.
"""

from __future__ import annotations

import _codecs
import collections
import enum
import functools
import importlib
import pathlib
import pickle
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


class Refused(Exception):
    """A global or a call the file may not make; `safe_pickle` names the file and the rule."""

    def __init__(self, qualified: str, kind: str) -> None:
        super().__init__(qualified)
        self.qualified = qualified
        self.kind = kind  # "denied", "not_allowed" or "call"


def names(text: str) -> frozenset[str]:
    """The whitespace-separated names of `text`."""
    return frozenset(text.split())


RECONSTRUCTORS = names(
    """
    torch._utils._rebuild_tensor torch._utils._rebuild_tensor_v2 torch._utils._rebuild_tensor_v3
    torch._utils._rebuild_parameter torch._utils._rebuild_parameter_with_state
    torch._utils._rebuild_qtensor torch._utils._rebuild_sparse_tensor
    torch._utils._rebuild_meta_tensor_no_storage torch._utils._rebuild_nested_tensor
    torch._utils._rebuild_device_tensor_from_numpy
    torch._utils._rebuild_device_tensor_from_cpu_tensor torch.serialization._get_layout
    numpy._core.multiarray._reconstruct numpy._core.multiarray.scalar
    """
)
"""Functions that build a tensor, parameter, layout or array from plain values and storages."""

GUARDED = names(
    """
    copyreg._reconstructor copyreg.__newobj__ copyreg.__newobj_ex__
    torch._tensor._rebuild_from_type_v2 torch._utils._rebuild_wrapper_subclass _codecs.encode
    """
)
"""Functions that call an object the file chooses: replaced by checked versions."""

SAFE_BASES = frozenset(
    {object, dict, list, set, frozenset, tuple, int, float, complex, str, bytes, bytearray}
    | {bool, collections.OrderedDict}
)
"""Builtin types whose ``__new__``/``__init__`` build a value and run no other code."""

VALUE_TYPES = SAFE_BASES | {slice, range, torch.device, torch.Size, np.dtype}
"""Classes a file may call with its arguments (besides enums, paths and placeholders)."""


_GLOBAL_LIKE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType)
_GLOBAL_LIKE += (types.MethodType, enum.Enum)


def qualified_name(obj: Any) -> str:
    """``module.qualname`` of a class or function (its type's for anything else)."""
    named = obj if isinstance(obj, type | types.FunctionType | types.BuiltinFunctionType) else None
    named = named or type(obj)
    return f"{getattr(named, '__module__', '?')}.{getattr(named, '__qualname__', named.__name__)}"


@functools.cache
def _reconstructor_ids() -> frozenset[int]:
    found = set()
    for qualified in RECONSTRUCTORS:
        module, _, name = qualified.rpartition(".")
        try:
            found.add(id(getattr(importlib.import_module(module), name)))
        except (ImportError, AttributeError):
            continue  # another numpy/torch release: that name is simply not callable
    return frozenset(found)


def _callable_class(cls: type, inert: tuple[type, ...]) -> bool:
    if cls in VALUE_TYPES or issubclass(cls, inert) or issubclass(cls, enum.Enum):
        return True
    return issubclass(cls, pathlib.PurePath) and cls.__module__ == "pathlib"


class GuardedUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """``pickle``'s own unpickler with every opcode that calls or mutates checked.

    Subclasses give `resolve` (the allow-list: module, name -> object) and `inert` (placeholder
    classes, whose calls only record their arguments). The pure-Python unpickler is used
    because the C one calls ``REDUCE``'s callable without a hook; model pickles are small
    beside their tensor data, which torch reads separately.
    """

    inert: tuple[type, ...] = ()
    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, file: Any, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._named: set[int] = set()  # ids of the globals this file named
        self._guarded: dict[str, Callable[..., Any]] = {
            "copyreg._reconstructor": self._reconstructor,
            "copyreg.__newobj__": self._newobj,
            "copyreg.__newobj_ex__": self._newobj_ex,
            "torch._tensor._rebuild_from_type_v2": self._rebuild_from_type_v2,
            "torch._utils._rebuild_wrapper_subclass": self._rebuild_wrapper_subclass,
            "_codecs.encode": self._encode,
        }
        self._guarded_ids = {id(f) for f in self._guarded.values()}

    def resolve(self, module: str, name: str) -> Any:
        """The object the global names (or raise `Refused`)."""
        raise NotImplementedError

    def find_class(self, module: str, name: str) -> Any:
        obj = self.resolve(module, name)
        qualified = f"{module}.{name}"
        if qualified in GUARDED:
            return self._guarded[qualified]
        self._named.add(id(obj))
        return obj

    def extra_callables(self) -> frozenset[int]:
        """Ids of further functions the file may call (a policy's substitutes)."""
        return frozenset()

    # ------------------------------------------------------------------ the two ways to build

    def call(self, func: Any, args: tuple, kwargs: dict | None = None) -> Any:
        """``func(*args)`` if the rule lets the file call `func` with its own arguments."""
        kwargs = kwargs or {}
        allowed = (
            id(func) in _reconstructor_ids()
            or id(func) in self._guarded_ids
            or id(func) in self.extra_callables()
            or isinstance(func, self.inert)
            or (isinstance(func, type) and _callable_class(func, self.inert))
        )
        if not allowed:
            raise Refused(qualified_name(func), "call")
        return func(*args, **kwargs)

    def new(self, cls: Any, args: tuple, kwargs: dict) -> Any:
        """``cls.__new__(cls, *args)`` when no code of `cls` runs (object's or a builtin
        value type's ``__new__``), or `cls` may be called anyway; never ``__init__``."""
        if not isinstance(cls, type):
            raise Refused(qualified_name(cls), "call")
        make = cls.__new__
        if make is object.__new__:
            return object.__new__(cls)
        if getattr(make, "__self__", None) in SAFE_BASES or _callable_class(cls, self.inert):
            return make(cls, *args, **kwargs)
        raise Refused(qualified_name(cls), "call")

    def _reconstructor(self, cls: Any, base: Any, state: Any) -> Any:
        """``copyreg._reconstructor`` without its call of an arbitrary base's ``__init__``."""
        if not isinstance(cls, type) or base not in SAFE_BASES or not issubclass(cls, base):
            raise Refused(qualified_name(base), "call")
        if base is object:
            return self.new(cls, (), {})
        obj = base.__new__(cls, state)
        base.__init__(obj, state)
        return obj

    def _newobj(self, cls: Any, *args: Any) -> Any:
        return self.new(cls, args, {})

    def _newobj_ex(self, cls: Any, args: tuple, kwargs: dict) -> Any:
        return self.new(cls, tuple(args), dict(kwargs))

    def _rebuild_from_type_v2(self, func: Any, new_type: Any, args: tuple, state: Any) -> Any:
        if not (isinstance(new_type, type) and issubclass(new_type, torch.Tensor)):
            raise Refused(qualified_name(new_type), "call")
        ret = self.call(func, tuple(args))
        return torch._tensor._rebuild_from_type_v2(lambda: ret, new_type, (), state)

    def _rebuild_wrapper_subclass(self, cls: Any, *args: Any) -> Any:
        if not (isinstance(cls, type) and issubclass(cls, torch.Tensor)):
            raise Refused(qualified_name(cls), "call")
        return torch._utils._rebuild_wrapper_subclass(cls, *args)

    def _encode(self, text: Any, encoding: Any = "utf-8", errors: str = "strict") -> bytes:
        """Protocol-2 bytes are ``encode(str, 'latin1')``; no other codec is looked up."""
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
            raise Refused("_codecs.encode", "call")
        return _codecs.encode(text, "latin1", errors if errors == "strict" else "strict")

    # ------------------------------------------------------------------ opcodes that call

    def _target(self, obj: Any) -> None:
        """Refuse to mutate a global the file named (a class, function, module, enum, ...)."""
        if isinstance(obj, _GLOBAL_LIKE) or id(obj) in self._named:
            raise Refused(qualified_name(obj), "call")

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self.call(self.stack[-1], tuple(args))

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self.new(cls, tuple(args), {}))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self.new(cls, tuple(args), dict(kwargs)))

    def _instantiate(self, klass: Any, args: tuple) -> None:  # INST, OBJ
        if args or not isinstance(klass, type):
            self.append(self.call(klass, tuple(args)))
        else:
            self.append(self.new(klass, (), {}))

    def load_build(self) -> None:
        self._target(self.stack[-2])
        super().load_build()

    def load_append(self) -> None:
        self._target(self.stack[-2])
        super().load_append()

    def load_setitem(self) -> None:
        self._target(self.stack[-3])
        super().load_setitem()

    def _marked_target(self) -> None:
        if self.metastack and self.metastack[-1]:
            self._target(self.metastack[-1][-1])

    def load_appends(self) -> None:
        self._marked_target()
        super().load_appends()

    def load_setitems(self) -> None:
        self._marked_target()
        super().load_setitems()

    def load_additems(self) -> None:
        self._marked_target()
        super().load_additems()

    for _opcode, _handler in {
        pickle.REDUCE: load_reduce,
        pickle.NEWOBJ: load_newobj,
        pickle.NEWOBJ_EX: load_newobj_ex,
        pickle.BUILD: load_build,
        pickle.APPEND: load_append,
        pickle.APPENDS: load_appends,
        pickle.SETITEM: load_setitem,
        pickle.SETITEMS: load_setitems,
        pickle.ADDITEMS: load_additems,
    }.items():
        dispatch[_opcode[0]] = _handler
    del _opcode, _handler

"""The network of an nnU-Net model, built from its plans as nnU-Net builds it, safely.

The plans name the network class by a dotted path (``network_class_name``) and some of its
arguments too (``_kw_requires_import``: ``conv_op``, ``norm_op``, ...). Those names are
untrusted input: each must resolve to an ``nn.Module`` class defined in
``dynamic_network_architectures`` or nnU-Net itself (arguments also in ``torch.nn``), or be
named exactly in ``model.allow_globals``; nothing else is imported or called. The trainer
class a checkpoint names is never imported: the network comes from nnU-Net's
``get_network_from_plans`` with deep supervision off, which is what ``nnUNetTrainer``'s
``build_network_architecture`` does at inference.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch

from evalharness.errors import SourceError
from evalharness.model.nnunet import PLANS, NnunetModel

EXTRA_HINT = 'pip install -e ".[nnunet]"'
NETWORK_MODULES = ("dynamic_network_architectures.", "nnunetv2.")
ARGUMENT_MODULES = (*NETWORK_MODULES, "torch.nn.")


def require_nnunetv2() -> None:
    """nnunetv2 importable, or one line naming the extra that installs it."""
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        raise SourceError(
            f"model=nnunet needs nnunetv2, which is not installed: {EXTRA_HINT}"
        ) from None


def _locate(name: str) -> Any:
    """The object a dotted path names, importing only the modules along the path."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
        return obj
    return None


def checked_class(name: Any, key: str, modules: Sequence[str], allowed: Sequence[str]) -> type:
    """The ``nn.Module`` class `name` (from the plans' `key`) if it lies in `modules` or is
    listed in `allowed`; `SourceError` otherwise, before anything outside them is imported."""
    text = str(name)
    trusted = text in allowed
    if not trusted and not text.startswith(tuple(modules)):
        raise SourceError(
            f"{PLANS}: {key} '{text}' is outside {', '.join(m.rstrip('.') for m in modules)} "
            "(add it to model.allow_globals if you trust it)"
        )
    found = _locate(text)
    defined_in = str(getattr(found, "__module__", "")) + "."
    if not (isinstance(found, type) and issubclass(found, torch.nn.Module)):
        raise SourceError(f"{PLANS}: {key} '{text}' is not a torch.nn.Module class")
    if not trusted and not defined_in.startswith(tuple(modules)):
        raise SourceError(
            f"{PLANS}: {key} '{text}' resolves to {defined_in.rstrip('.')}.{found.__name__}, "
            "outside the allowed modules (add it to model.allow_globals if you trust it)"
        )
    return found


def check_architecture(model: NnunetModel, allowed: Sequence[str] = ()) -> dict:
    """The configuration's ``architecture`` entry once every class it names is allowed."""
    configuration = model.plans["configurations"][model.configuration]
    architecture = configuration.get("architecture")
    if not isinstance(architecture, dict) or "network_class_name" not in architecture:
        raise SourceError(
            f"{model.folder / PLANS}: configuration '{model.configuration}' has no "
            "architecture.network_class_name (expected plans written by nnU-Net >= 2.4)"
        )
    name = architecture["network_class_name"]
    checked_class(name, "network_class_name", NETWORK_MODULES, allowed)
    kwargs = architecture.get("arch_kwargs") or {}
    for key in architecture.get("_kw_requires_import") or ():
        if kwargs.get(key) is not None:
            checked_class(kwargs[key], f"arch_kwargs.{key}", ARGUMENT_MODULES, allowed)
    return architecture


def build_fold_networks(model: NnunetModel, allowed: Sequence[str] = ()) -> list[torch.nn.Module]:
    """One network per fold, in eval mode on the CPU, with the fold's weights."""
    require_nnunetv2()
    architecture = check_architecture(model, allowed)
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(model.plans)
    configuration = plans_manager.get_configuration(model.configuration)
    n_in = determine_num_input_channels(plans_manager, configuration, model.dataset_json)
    n_out = plans_manager.get_label_manager(model.dataset_json).num_segmentation_heads
    networks = []
    for fold in model.folds:
        network = get_network_from_plans(
            architecture["network_class_name"],
            architecture.get("arch_kwargs") or {},
            architecture.get("_kw_requires_import") or (),
            n_in,
            n_out,
            allow_init=False,
            deep_supervision=False,
        )
        try:
            network.load_state_dict(fold.weights)
        except RuntimeError as error:
            raise SourceError(
                f"{fold.path}: its weights do not fit the network the plans describe "
                f"({' '.join(str(error).split())[:200]})"
            ) from None
        networks.append(network.eval())
    return networks

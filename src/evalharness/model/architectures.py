"""fastMONAI 0.12's model registry, rebuilt without fastMONAI.

fastMONAI's safetensors export (``fastMONAI.utils.save_safetensors_model``) names the network
by ``arch_id`` + ``arch_kwargs`` and its wrappers by ``wrapper_spec``, and keeps ``repr(model)``
in the metadata. Its loader rebuilds the network through ``_MODEL_CONSTRUCTORS`` (MONAI classes
after ``_normalize_monai_kwargs``) and ``_MODEL_WRAPPERS``, refuses a rebuild whose ``repr``
differs, and loads with ``safetensors.torch.load_model(strict=True)``, which restores tensors
that the file stores once although the network reaches them under several names (DynUNet's
``skip_layers.*`` alias ``input_block``/``downsamples``/...). This module does the same, so a
file fastMONAI loads, the harness loads, and one it refuses, the harness refuses by name.
"""

from __future__ import annotations

import importlib
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evalharness.errors import SourceError

# fastMONAI 0.12 `_MODEL_CONSTRUCTORS` segmentation ids -> (monai.networks.nets class, inner):
# `inner` keeps the built UNet's `.model` (the bare Sequential, without the UNet shell).
FASTMONAI_ARCHITECTURES = {
    "monai.unet": ("UNet", False),
    "monai.unet_inner": ("UNet", True),
    "monai.dynunet": ("DynUNet", False),
}
# Registered by fastMONAI but not segmentation networks: the harness cannot score them.
_NOT_SEGMENTATION = {"monai.classifier": "Classifier", "monai.regressor": "Regressor"}
# Further MONAI networks the harness rebuilds by class name (ids compared without case, '_'
# and '-': "monai.swin_unetr" is SwinUNETR), for exports made outside fastMONAI's registry.
_MONAI_NETS = "UNet DynUNet BasicUNet BasicUNetPlusPlus AttentionUnet SegResNet SegResNetDS"
_MONAI_NETS += " UNETR SwinUNETR VNet HighResNet"
OTHER_MONAI_ARCHITECTURES = {f"monai.{name.lower()}": name for name in _MONAI_NETS.split()}
KNOWN_ARCH_IDS = tuple(
    dict.fromkeys((*FASTMONAI_ARCHITECTURES, "segmamba.v2", *OTHER_MONAI_ARCHITECTURES))
)
DS_ADAPTER = "fastmonai.dynunet_ds_adapter"
_TUPLE_KEYS = ("channels", "strides", "kernel_size", "upsample_kernel_size", "filters")
_PAIR_KEYS = ("act", "norm", "dropout")


@dataclass(frozen=True)
class ModelSpec:
    """What a fastMONAI export says about its network (metadata values, JSON-decoded)."""

    arch_id: str
    arch_kwargs: dict[str, Any]
    wrapper_spec: list[dict[str, Any]]  # inner to outer: {"wrapper_id", "wrapper_kwargs"}
    repr: str | None  # fastMONAI's `repr(model)` at export; None in exports made elsewhere


class DynUNetDSAdapter(torch.nn.Module):
    """fastMONAI's ``DynUNetDSAdapter`` at inference: the wrapped network's main output.

    fastMONAI wraps a ``DynUNet(deep_supervision=True)`` so that in training its stacked heads
    become the list ``DeepSupervisionLoss`` wants; in eval mode it passes the prediction
    through, and an eval-mode DynUNet returns only its main (full-resolution) head. The harness
    never trains, so it keeps the wrapper (same name, so the same ``repr``; same ``model.``
    prefix on weight names) and only that eval-mode path: ``[B, C, X, Y, Z]`` in, out.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def normalize_monai_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """fastMONAI's ``_normalize_monai_kwargs``: JSON lists back to what MONAI was given.

    List-valued ``channels``/``strides``/``kernel_size``/``upsample_kernel_size``/``filters``
    become tuples, two-element ``act``/``norm``/``dropout`` lists become pairs (name, args).
    MONAI's ``repr`` and layer choices depend on it (a list ``norm`` is not a (name, args) pair).
    """
    normalized = dict(kwargs)
    for key in _TUPLE_KEYS:
        if isinstance(normalized.get(key), list):
            normalized[key] = tuple(normalized[key])
    for key in _PAIR_KEYS:
        value = normalized.get(key)
        if isinstance(value, list) and len(value) == 2:
            normalized[key] = (value[0], value[1])
    return normalized


def _monai_class(name: str) -> type[torch.nn.Module]:
    return getattr(importlib.import_module("monai.networks.nets"), name)


def _build_architecture(arch_id: str, arch_kwargs: Mapping[str, Any], path: Path):
    if arch_id in _NOT_SEGMENTATION:
        raise SourceError(
            f"{path}: arch_id '{arch_id}' is a MONAI {_NOT_SEGMENTATION[arch_id]}, not a "
            "segmentation network; the harness evaluates segmentation models only"
        )
    if arch_id == "segmamba.v2":
        return _build_segmamba(arch_kwargs, path)
    if arch_id in FASTMONAI_ARCHITECTURES:
        class_name, inner = FASTMONAI_ARCHITECTURES[arch_id]
    else:
        class_name = OTHER_MONAI_ARCHITECTURES.get(re.sub(r"[_\-]", "", arch_id.lower()))
        inner = False
        if class_name is None:
            raise SourceError(
                f"{path}: unknown arch_id '{arch_id}' (known: {', '.join(KNOWN_ARCH_IDS)}); "
                "set model.arch instead"
            )
    try:
        network = _monai_class(class_name)(**normalize_monai_kwargs(arch_kwargs))
    except (TypeError, ValueError, AssertionError) as error:
        raise SourceError(f"{path}: cannot build {arch_id} from arch_kwargs: {error}") from None
    return network.model if inner else network


def _build_segmamba(arch_kwargs: Mapping[str, Any], path: Path) -> torch.nn.Module:
    """fastMONAI's ``segmamba.v2``: ``models_segmamba.segmambav2.SegMamba`` of a fork."""
    try:
        from models_segmamba.segmambav2 import SegMamba  # type: ignore[import-not-found]
    except ImportError:
        raise SourceError(
            f"{path}: arch_id 'segmamba.v2' needs the SegMamba-V2 fork fastMONAI supports "
            "(module models_segmamba), which is not on the package index: install that fork "
            "from its repository, or export the model as TorchScript"
        ) from None
    return SegMamba(**arch_kwargs)


def network_bytes(network: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of `network` (shared tensors counted once)."""
    tensors = {id(t): t for t in (*network.parameters(), *network.buffers())}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def build_network(spec: ModelSpec, path: Path, max_bytes: int | None = None) -> torch.nn.Module:
    """The network ``spec`` describes, wrappers applied inner to outer (not yet loaded).

    With `max_bytes` (what the file's weights justify) it is first built on the ``meta``
    device, which allocates nothing: metadata describing a far larger network (a file's
    ``arch_kwargs`` with huge channel counts would exhaust the memory) is refused."""
    if max_bytes is not None and spec.arch_id != "segmamba.v2":
        with torch.device("meta"):
            needed = network_bytes(_build_architecture(spec.arch_id, spec.arch_kwargs, path))
        if needed > max_bytes:
            raise SourceError(
                f"{path}: arch_kwargs describe a network of {needed / 2**20:.0f} MiB of "
                f"weights, far more than the file holds ({max_bytes / 2**20:.0f} MiB allowed); "
                "refusing to build it"
            )
    network = _build_architecture(spec.arch_id, spec.arch_kwargs, path)
    for wrapper in spec.wrapper_spec:
        wrapper_id = wrapper.get("wrapper_id") if isinstance(wrapper, Mapping) else None
        if wrapper_id != DS_ADAPTER:
            raise SourceError(
                f"{path}: wrapper_spec entry {wrapper} is not supported (known: {DS_ADAPTER}); "
                "set model.arch to rebuild it"
            )
        if wrapper.get("wrapper_kwargs"):
            raise SourceError(f"{path}: {DS_ADAPTER} takes no wrapper_kwargs, got {wrapper}")
        network = DynUNetDSAdapter(network)
    return network


def check_repr(network: torch.nn.Module, spec: ModelSpec, path: Path) -> None:
    """Refuse a rebuild whose ``repr`` differs from the export's (fastMONAI does too)."""
    if spec.repr is None:
        return
    rebuilt, saved = repr(network).splitlines(), spec.repr.splitlines()
    if rebuilt == saved:
        return
    index = next(
        (i for i, (a, b) in enumerate(zip(rebuilt, saved, strict=False)) if a != b),
        min(len(rebuilt), len(saved)),
    )
    ours = rebuilt[index].strip() if index < len(rebuilt) else "<end>"
    theirs = saved[index].strip() if index < len(saved) else "<end>"
    raise SourceError(
        f"{path}: the {spec.arch_id} network rebuilt from arch_kwargs does not match the "
        f"file's repr metadata (line {index + 1}: rebuilt {ours!r}, file {theirs!r}); "
        "refusing a partial load"
    )


def _shared_groups(network: torch.nn.Module) -> list[list[str]]:
    """Names of ``network.state_dict()`` that reach the same tensor, one list per tensor."""
    by_view: dict[tuple, list[str]] = defaultdict(list)
    for name, tensor in network.state_dict(keep_vars=True).items():
        if tensor.numel() == 0:
            continue
        view = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
        )
        by_view[view].append(name)
    return [names for names in by_view.values() if len(names) > 1]


def with_shared_aliases(
    network: torch.nn.Module, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state`` plus every other name of a tensor the network shares and ``state`` holds once.

    ``safetensors.torch.save_model`` stores a shared tensor under one of its names; its
    ``load_model`` restores the rest. A name group with no member in ``state`` stays missing.
    """
    completed = dict(state)
    for names in _shared_groups(network):
        present = next((name for name in names if name in state), None)
        if present is not None:
            for name in names:
                completed.setdefault(name, state[present])
    return completed

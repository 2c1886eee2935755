"""Load one local model file into an ``nn.Module``, choosing the loader by the file's content.

The content decides, never the name: fastMONAI safetensors (rebuilt from its ``arch_id`` as
fastMONAI does, see :mod:`evalharness.model.architectures`, or from ``model.arch``),
TorchScript, a state dict plus ``model.arch`` (or plus a fastMONAI sibling's metadata:
:func:`load_state_dict_with_metadata`), or a pickle (fastai Learner export, pickled module)
through the restricted unpickler of :mod:`evalharness.model.safe_pickle`.
Every failure is a one-line :class:`SourceError`.
"""

from __future__ import annotations

import contextlib
import json
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from evalharness.config.schema import ModelConfig
from evalharness.errors import SourceError, first_line
from evalharness.model.architectures import (
    ModelSpec,
    build_network,
    check_repr,
    with_shared_aliases,
)
from evalharness.model.safe_pickle import is_placeholder, load_model_pickle
from evalharness.model.sources import ResolvedModel
from evalharness.model.targets import instantiate
from evalharness.model.training_config import read_safetensors_metadata

NOT_A_MODEL = (
    "is not a model (expected a fastai Learner export, a pickled nn.Module, "
    "a fastMONAI .safetensors, a state dict + model.arch, or TorchScript)"
)


@dataclass(frozen=True)
class LoadedModel:
    """A network ready for inference and how it was obtained."""

    network: torch.nn.Module  # in eval() mode, on CPU
    loader: str  # fastai_learner|pickled_module|safetensors|state_dict|torchscript|trusted_pickle
    inference_config: dict | None  # fastMONAI safetensors `inference_config`, parsed
    arch: dict | None  # {"arch_id", "arch_kwargs"}, the model.arch mapping, or {"class": ...}


def _zip_kind(path: Path) -> str | None:
    """'torchscript', 'torch_zip' (``torch.save``), 'zip' (anything else) or None."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    return "torch_zip" if any(n.endswith("/data.pkl") for n in names) else "zip"


def _plain_mapping(arch: Mapping[str, Any]) -> dict:
    return dict(arch)


def _instantiate(arch: Mapping[str, Any], path: Path) -> torch.nn.Module:
    """Build ``model.arch`` (a Hydra-style ``_target_`` mapping)."""
    if "_target_" not in arch:
        raise SourceError(f"{path}: model.arch needs a '_target_' (e.g. monai.networks.nets.UNet)")
    try:
        network = instantiate(arch)
    except Exception as error:  # any import or constructor error
        raise SourceError(f"{path}: cannot build model.arch: {first_line(error)}") from None
    if not isinstance(network, torch.nn.Module):
        raise SourceError(f"{path}: model.arch built a {type(network).__name__}, not an nn.Module")
    return network


def load_fitting_weights(
    network: torch.nn.Module, state: Mapping[str, Any], path: Path, what: str | None = None
) -> None:
    """Load `state` into `network` only when every key and shape fits; otherwise one line
    naming `path`, `what` it should fit (default: the network's class) and the keys that differ."""
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(
        k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or reshaped:
        what = what or f"the {type(network).__name__} architecture"
        raise SourceError(
            f"{path}: weights do not fit {what}: {len(missing)} missing {missing[:4]}, "
            f"{len(unexpected)} unexpected {unexpected[:4]}, {len(reshaped)} of another shape "
            f"{reshaped[:4]}"
        )
    network.load_state_dict(state, strict=True)


def _json_metadata(metadata: Mapping[str, str], key: str, default: str, path: Path) -> Any:
    try:
        return json.loads(metadata.get(key) or default)
    except (ValueError, RecursionError) as error:
        raise SourceError(f"{path}: unreadable safetensors metadata '{key}' ({error})") from None


def model_spec(metadata: Mapping[str, str], path: Path) -> ModelSpec:
    """The architecture a fastMONAI safetensors ``metadata`` names (``path``: for errors)."""
    arch_kwargs = _json_metadata(metadata, "arch_kwargs", "{}", path)
    wrappers = _json_metadata(metadata, "wrapper_spec", "[]", path)
    if not isinstance(arch_kwargs, dict) or not isinstance(wrappers, list):
        raise SourceError(f"{path}: safetensors metadata arch_kwargs/wrapper_spec malformed")
    return ModelSpec(str(metadata.get("arch_id", "")), arch_kwargs, wrappers, metadata.get("repr"))


def _rebuilt(
    state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: Path, loader: str
) -> LoadedModel:
    """fastMONAI's ``load_safetensors_model``: rebuild, compare ``repr``, strict load."""
    spec = model_spec(metadata, path)
    stored = sum(t.numel() * t.element_size() for t in state.values())
    network = build_network(spec, path, max_bytes=2 * stored + 16 * 2**20)
    check_repr(network, spec, path)
    load_fitting_weights(network, with_shared_aliases(network, state), path)
    arch_info = {"arch_id": spec.arch_id, "arch_kwargs": spec.arch_kwargs}
    if spec.wrapper_spec:
        arch_info["wrapper_spec"] = spec.wrapper_spec
    inference_config = _json_metadata(metadata, "inference_config", "null", path)
    return LoadedModel(network.eval(), loader, inference_config, arch_info)


def _from_safetensors(
    path: Path, metadata: Mapping[str, str], arch: Mapping[str, Any] | None
) -> LoadedModel:
    try:
        state = load_safetensors(str(path), device="cpu")
    except (SafetensorError, OSError) as error:  # e.g. data shorter than the header's offsets
        raise SourceError(f"{path}: unreadable safetensors file ({first_line(error)})") from None
    if arch is None:
        return _rebuilt(state, metadata, path, "safetensors")
    network = _instantiate(arch, path)
    load_fitting_weights(network, with_shared_aliases(network, state), path)
    inference_config = _json_metadata(metadata, "inference_config", "null", path)
    return LoadedModel(network.eval(), "safetensors", inference_config, _plain_mapping(arch))


def load_state_dict_with_metadata(path: Path, metadata: Mapping[str, str]) -> LoadedModel:
    """A fastai ``learn.save`` file (``best_weights.pth``) rebuilt from a sibling's metadata.

    fastMONAI's MLflow callback logs ``model/best_weights.pth`` next to
    ``model/best_model.safetensors`` (and ``final_*``); the weights file has no architecture,
    the safetensors ``metadata`` (as :func:`read_safetensors_metadata` returns it) does. The
    file holds a plain state dict (read with ``weights_only=True``) or fastai's
    ``{'model': state_dict, 'opt': ...}`` (``with_opt=True``; its optimizer state holds
    fastcore objects, so the restricted unpickler reads it and the state is dropped).
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"model file not found: {path}")
    obj = _unpickle(path, (), trust_pickle=False)
    state = _fastai_checkpoint_state(obj)
    if not _is_state_dict(state):
        raise SourceError(f"{path}: not a state dict; it holds a {type(obj).__name__}")
    return _rebuilt(state, metadata, path, "state_dict")


def _fastai_checkpoint_state(obj: Any) -> Any:
    """The state dict inside fastai's ``learn.save(with_opt=True)`` ``{'model', 'opt'}``."""
    if isinstance(obj, Mapping) and set(obj) == {"model", "opt"} and _is_state_dict(obj["model"]):
        return obj["model"]
    return obj


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _from_unpickled(
    obj: Any, path: Path, arch: Mapping[str, Any] | None, trusted: bool
) -> LoadedModel:
    obj = _fastai_checkpoint_state(obj)
    if _is_state_dict(obj):
        if arch is None:
            raise SourceError(
                f"{path} is a state dict: model.arch is required "
                "(e.g. {_target_: monai.networks.nets.UNet, spatial_dims: 3, ...})"
            )
        network = _instantiate(arch, path)
        load_fitting_weights(network, with_shared_aliases(network, obj), path)
        return LoadedModel(network.eval(), "state_dict", None, _plain_mapping(arch))
    if isinstance(obj, torch.nn.Module):
        network, loader = obj, "pickled_module"
    elif isinstance(getattr(obj, "model", None), torch.nn.Module) and (
        trusted or is_placeholder(obj)
    ):
        network, loader = obj.model, "fastai_learner"
    else:
        raise SourceError(f"{path} {NOT_A_MODEL}; it holds a {type(obj).__name__}")
    _refuse_placeholder_layers(network, path)
    kind = type(network)
    arch_info = {"class": f"{kind.__module__}.{kind.__qualname__}"}
    return LoadedModel(
        network.cpu().eval(), "trusted_pickle" if trusted else loader, None, arch_info
    )


def _refuse_placeholder_layers(network: torch.nn.Module, path: Path) -> None:
    """A layer from fastai/fastMONAI inside the network would be an inert placeholder."""
    stack = [network]
    while stack:
        for name, child in stack.pop()._modules.items():
            if is_placeholder(child):
                raise SourceError(
                    f"{path}: layer '{name}' of the network is a {child!r}; install that library "
                    "and list the class in model.allow_globals, or export safetensors"
                )
            if isinstance(child, torch.nn.Module):
                stack.append(child)


def load_model_file(
    path: Path,
    *,
    arch: Mapping[str, Any] | None = None,
    allow_globals: Sequence[str] = (),
    trust_pickle: bool = False,
) -> LoadedModel:
    """Load a network from ``path``, choosing the loader by the file's content.

    safetensors (fastMONAI safe artifact, or weights for ``arch``) -> rebuild and load;
    TorchScript zip -> ``torch.jit.load``; torch zip or plain pickle -> ``torch.load`` with
    ``weights_only=True`` first (plain state dicts), else the restricted unpickler of
    `safe_pickle` (``trust_pickle=True``: unrestricted, runs the file's code).
    ``arch`` (Hydra ``_target_`` mapping) is needed for state dicts and overrides a
    safetensors ``arch_id``; a pickled network carries its own architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"model file not found: {path}")
    metadata = read_safetensors_metadata(path)
    if metadata is not None:
        return _from_safetensors(path, metadata, arch)
    kind = _zip_kind(path)
    if kind == "torchscript":
        try:
            network = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as error:
            raise SourceError(f"{path}: cannot load TorchScript: {first_line(error)}") from None
        return LoadedModel(network.eval(), "torchscript", None, None)
    if kind == "zip":
        raise SourceError(f"{path} {NOT_A_MODEL}; it is a zip archive")
    obj = _unpickle(path, allow_globals, trust_pickle)
    return _from_unpickled(obj, path, arch, trusted=trust_pickle)


def _unpickle(path: Path, allow_globals: Sequence[str], trust_pickle: bool) -> Any:
    if not trust_pickle:
        # torch's own weights-only unpickler is the tighter one when it suffices (state dicts);
        # its warnings about pickles it then refuses are noise.
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    try:
        return load_model_pickle(path, allow_globals=allow_globals, trust_pickle=trust_pickle)
    except SourceError:
        raise
    except Exception as error:  # any unpickling failure means "not a loadable model"
        raise SourceError(f"{path} {NOT_A_MODEL}; unpickling failed: {first_line(error)}") from None


def load_resolved_model(resolved: ResolvedModel, source: ModelConfig) -> LoadedModel:
    """Load the resolved model file with the `model.*` loading options; a state dict with a
    safetensors sibling (and no `model.arch`) is rebuilt from the sibling's metadata; a model
    family's source (a MONAI bundle's) loads its own network (`ResolvedModel.contents`)."""
    if resolved.contents is not None:
        return resolved.contents.load()
    if source.arch is None and resolved.sibling_metadata_path is not None:
        metadata = read_safetensors_metadata(resolved.sibling_metadata_path) or {}
        return load_state_dict_with_metadata(resolved.local_path, metadata)
    return load_model_file(
        resolved.local_path,
        arch=source.arch,
        allow_globals=list(source.allow_globals),
        trust_pickle=bool(source.trust_pickle),
    )

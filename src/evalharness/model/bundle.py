"""A MONAI bundle folder read for evaluation: its config's needed ids, checked; its metadata;
its weights, loaded without running the bundle's code.

The bundle standard's inference properties are the ids the evaluation needs:
``network_def`` (with ``models/model.pt``), ``preprocessing``, ``inferer`` and
``postprocessing`` of ``configs/inference.json`` (or ``.yaml``/``.yml``); `read_bundle` closes
and checks them (`bundle_safety`), and never touches any other id. The weights are
``models/model.pt`` (a state dict, read with torch's weights-only unpickler, or the harness's
restricted one, and fitted strictly to ``network_def``) or, when that is all the bundle has,
``models/model.ts``: TorchScript, a graph of torch operators that `torch.jit.load` runs without
importing or running any Python from the file (the harness's `torchscript` loader does the same
for a model file). Every failure is a one-line `SourceError` naming the file or id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from evalharness.errors import SourceError, first_line
from evalharness.model.bundle_safety import closed_config, instantiate, target_class
from evalharness.model.loaders import (
    LoadedModel,
    _fastai_checkpoint_state,
    _unpickle,
    load_fitting_weights,
)

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
METADATA = "configs/metadata.json"
STATE_DICT, TORCHSCRIPT = "models/model.pt", "models/model.ts"
NEEDED_IDS = ("preprocessing", "inferer", "postprocessing")
NETWORK_ID = "network_def"
OUTPUT_WRITERS = ("SaveImaged", "SaveImage")
"""Post-processing the evaluation leaves to itself (`output.save_predictions`): never read."""


@dataclass(frozen=True)
class Bundle:
    """The needed ids of a bundle (closed configs, `bundle_safety`), its metadata and files."""

    root: Path
    config_file: str  # relative to root: configs/inference.json, ...
    name: str  # metadata `name` (the folder's name when it has none)
    version: str  # metadata `version` ("" when none)
    weights: str  # relative to root: models/model.pt or models/model.ts
    files: tuple[tuple[str, str], ...]  # (relative path, sha256) of every file used
    trusted: bool
    network_def: Any  # closed config; None with models/model.ts
    preprocessing: Any
    inferer: Any
    postprocessing: Any
    data_format: Mapping[str, Any] | None  # metadata `network_data_format`

    @property
    def sha256(self) -> str:
        """One checksum over the files used (path and sha256 of each)."""
        text = "\n".join(f"{path} {sha}" for path, sha in self.files)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def loader(self) -> str:
        return "bundle_torchscript" if self.weights == TORCHSCRIPT else "bundle_state_dict"


def looks_like_bundle(paths: list[str]) -> bool:
    """Whether relative file paths hold a bundle: a config under configs/ and a models/ file."""
    has_config = any(p in (f"configs/{n}" for n in CONFIG_NAMES) or p == METADATA for p in paths)
    return has_config and any(p.startswith("models/") for p in paths)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_config(root: Path) -> Path:
    """configs/inference.json (or .yaml, .yml) of bundle folder `root`."""
    for name in CONFIG_NAMES:
        if (root / "configs" / name).is_file():
            return root / "configs" / name
    raise SourceError(
        f"{root}: no configs/inference.json (or inference.yaml, inference.yml); expected a "
        "MONAI bundle folder"
    )


def _metadata(root: Path) -> dict:
    path = root / METADATA
    if not path.is_file():
        return {}
    try:
        found = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(found, dict):
        raise SourceError(f"{path}: expected a JSON object")
    return found


def _parser(config: Path) -> ConfigParser:
    parser = ConfigParser()
    try:
        parser.read_config(str(config))
        parser.resolve_macro_and_relative_ids()  # rewrites strings, reads macro files: no code
    except Exception as error:  # malformed JSON/YAML, a macro naming a missing file
        raise SourceError(
            f"{config}: cannot read the bundle config ({first_line(error)})"
        ) from None
    return parser


def _weights(root: Path) -> str:
    for name in (STATE_DICT, TORCHSCRIPT):
        if (root / name).is_file():
            return name
    raise SourceError(f"{root}: no {STATE_DICT} (or {TORCHSCRIPT}); expected the bundle's weights")


def _is_output_writer(where: str, value: Mapping[str, Any]) -> bool:
    target = value.get("_target_")
    return isinstance(target, str) and target.rsplit(".", 1)[-1] in OUTPUT_WRITERS


def read_bundle(root: Path, *, trusted: bool = False) -> Bundle:
    """Read bundle folder `root`: its needed ids closed and checked (module doc), metadata and
    the checksums of the files used. Nothing of the bundle is instantiated here."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise SourceError(f"model.path: bundle folder not found: {root}")
    config = find_config(root)
    weights = _weights(root)
    parser = _parser(config)
    metadata = _metadata(root)
    ids = (NETWORK_ID, *NEEDED_IDS) if weights == STATE_DICT else NEEDED_IDS
    top = parser.get()
    missing = [i for i in ids if i not in top]
    if missing:
        raise SourceError(
            f"{config}: no id {', '.join(repr(i) for i in missing)}; the evaluation needs "
            f"{', '.join(ids)} (the bundle standard's inference properties)"
        )
    closed = {i: closed_config(parser, i, trusted=trusted, skip=_is_output_writer) for i in ids}
    used = [config.relative_to(root).as_posix(), weights]
    if metadata:
        used.append(METADATA)
    files = tuple((p, _file_sha256(root / p)) for p in used)
    data_format = metadata.get("network_data_format")
    return Bundle(
        root=root,
        config_file=used[0],
        name=str(metadata.get("name") or root.name),
        version=str(metadata.get("version") or ""),
        weights=weights,
        files=files,
        trusted=trusted,
        network_def=closed.get(NETWORK_ID),
        preprocessing=closed["preprocessing"],
        inferer=closed["inferer"],
        postprocessing=closed["postprocessing"],
        data_format=data_format if isinstance(data_format, Mapping) else None,
    )


class BundleNetwork(torch.nn.Module):
    """The bundle's network as the sliding window runs it: its logits are blended across
    patches and activated afterwards (`blends_logits`), as MONAI's inferer followed by the
    bundle's ``Activationsd`` does. `in_channels`: the network's, else the metadata's."""

    blends_logits = True

    def __init__(self, network: torch.nn.Module, in_channels: int) -> None:
        super().__init__()
        self.network = network
        self.in_channels = in_channels

    def forward(self, patch: torch.Tensor) -> torch.Tensor:
        """[B, C, X, Y, Z] -> logits [B, K, X, Y, Z]."""
        output = self.network(patch)
        return output[0] if isinstance(output, (tuple, list)) else output


def _in_channels(bundle: Bundle, network: torch.nn.Module) -> int:
    """The network's input channels (its first layer's), else the metadata's, else 1."""
    found = next((m.in_channels for m in network.modules() if hasattr(m, "in_channels")), None)
    if isinstance(found, int):
        return found
    inputs = (bundle.data_format or {}).get("inputs") or {}
    for spec in inputs.values():
        if isinstance(spec, Mapping) and isinstance(spec.get("num_channels"), int):
            return int(spec["num_channels"])
    return 1


def _state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    obj = _fastai_checkpoint_state(_unpickle(path, (), trust_pickle=False))
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]  # CheckpointSaver's {"model": ..., "optimizer": ...}
    if not (
        isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())
    ):
        raise SourceError(
            f"{path}: expected a state dict of network_def; it holds a {type(obj).__name__}"
        )
    return obj


def load_bundle_network(bundle: Bundle) -> LoadedModel:
    """The bundle's network with its weights, wrapped in `BundleNetwork`, in eval mode on CPU."""
    path = bundle.root / bundle.weights
    if bundle.weights == TORCHSCRIPT:
        try:
            network = torch.jit.load(str(path), map_location="cpu")
        except Exception as error:  # not TorchScript, truncated, unknown operators
            raise SourceError(f"{path}: cannot load TorchScript ({first_line(error)})") from None
        arch = {"torchscript": bundle.weights}
    else:
        state = _state_dict(path)
        network = instantiate(bundle.network_def, NETWORK_ID)
        if not isinstance(network, torch.nn.Module):
            raise SourceError(f"{bundle.root / bundle.config_file}: network_def is not a network")
        target = target_class(bundle.network_def)
        load_fitting_weights(
            network, state, path, f"network_def ({target} of {bundle.config_file})"
        )
        arch = {"network_def": target}
    wrapped = BundleNetwork(network, _in_channels(bundle, network)).eval()
    return LoadedModel(wrapped, bundle.loader, None, arch)

"""Find a MONAI bundle (``model=bundle``): a local folder (``model.path``) or, among an MLflow
run's artifacts, the folder whose content makes it a bundle (``configs/inference.json`` or
``configs/metadata.json`` plus ``models/``; ``model.artifact`` names the folder when a run holds
several). A run's bundle is downloaded once into the model cache (its ``configs/`` and
``models/``, keyed by run, folder, file sizes and the run's end time), then read like a local
one (`bundle.read_bundle`); its contract (`bundle_contract`) is the training configuration.
"""

from __future__ import annotations

import hashlib
import posixpath
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from evalharness.config.schema import ModelConfig
from evalharness.errors import SourceError, first_line
from evalharness.mlflow_client import client_for
from evalharness.model.bundle import (
    CONFIG_NAMES,
    METADATA,
    Bundle,
    load_bundle_network,
    looks_like_bundle,
    read_bundle,
)
from evalharness.model.bundle_contract import BundleContract, bundle_contract
from evalharness.model.discovery import MODEL_FOLDER, choose_model_artifact
from evalharness.model.download_cache import build_once
from evalharness.model.loaders import LoadedModel
from evalharness.model.sources import (
    SPLIT_VERSION_TAG,
    ResolvedModel,
    _locate_run,
    _training_split,
    _walk,
    normalise_artifact_path,
)

_SEARCH_DEPTH = 6  # artifact folder levels searched for a bundle
_MARKERS = (*(f"configs/{name}" for name in CONFIG_NAMES), METADATA)
FETCHED = ("configs", "models")  # what of a run's bundle is downloaded


@dataclass(frozen=True)
class ResolvedBundle:
    """A bundle read for evaluation and what it means for it."""

    bundle: Bundle
    contract: BundleContract

    def load(self) -> LoadedModel:
        """The bundle's network with its weights (`bundle.load_bundle_network`)."""
        return load_bundle_network(self.bundle)


def bundle_folders(paths: list[str]) -> list[str]:
    """Run-relative folders that hold a bundle (`bundle.looks_like_bundle`), shallowest first
    ("" for the artifact root)."""
    roots = set()
    for path in paths:
        for marker in _MARKERS:
            if path == marker or path.endswith(f"/{marker}"):
                roots.add(path[: -len(marker)].rstrip("/"))
    found = []
    for root in roots:
        prefix = f"{root}/" if root else ""
        inside = [p[len(prefix) :] for p in paths if p.startswith(prefix)]
        if looks_like_bundle(inside):
            found.append(root)
    return sorted(found, key=lambda r: (r.count("/") + bool(r), r))


def _download(
    run: Run, folder: str, files: list[tuple[str, int]], cache_dir: Path, uri: str
) -> tuple[Path, bool]:
    """The bundle's configs/ and models/ in the cache (downloaded once, atomically)."""
    run_id = run.info.run_id
    listing = "\n".join(f"{p} {s}" for p, s in sorted(files))
    key = hashlib.sha256(f"{folder}\n{listing}\n{run.info.end_time}".encode()).hexdigest()[:16]
    entry = Path(cache_dir) / run_id / f"bundle-{key}"

    def fetch(staging: Path) -> Path:
        kept = staging / "bundle"
        kept.mkdir()
        for sub in FETCHED:
            path = posixpath.join(folder, sub) if folder else sub
            if any(p.startswith(f"{path}/") for p, _ in files):
                got = mlflow.artifacts.download_artifacts(
                    run_id=run_id,
                    artifact_path=path,
                    dst_path=str(staging / "download"),
                    tracking_uri=uri,
                )
                shutil.move(got, kept / sub)
        return kept

    downloaded = build_once(entry, fetch)
    return entry, downloaded


def _from_run(client: MlflowClient, run: Run, artifact: str | None, cache_dir: Path, uri: str):
    run_id = run.info.run_id
    listed = [(f.path, f.file_size or 0) for f in _walk(client, run_id, _SEARCH_DEPTH, 100_000)]
    paths = [p for p, _ in listed]
    if artifact is not None:
        folder, reason = artifact.rstrip("/"), "model.artifact"
        if folder not in bundle_folders(paths):
            raise SourceError(
                f"run '{run_id}': artifact folder '{folder}' is not a MONAI bundle (expected "
                "configs/inference.json or configs/metadata.json, and models/)"
            )
    else:
        found = bundle_folders(paths)
        if not found:
            has = ", ".join(paths[:20]) or "no artifacts"
            raise SourceError(
                f"run '{run_id}' holds no MONAI bundle (looked for a folder with "
                f"configs/inference.json or configs/metadata.json, and models/; it has: {has})"
            )
        folder = found[0]
        reason = "found by content" + (
            f" (first of {len(found)}: {', '.join(found)})" if len(found) > 1 else ""
        )
    prefix = f"{folder}/" if folder else ""
    files = [(p, s) for p, s in listed if p.startswith(prefix)]
    root, downloaded = _download(run, folder, files, cache_dir, uri)
    return root, folder, reason, downloaded


def holds_bundle(source: ModelConfig, tracking_uri: str) -> bool:
    """Whether a model with ``model.family`` unset is a bundle: ``model.path`` is a folder with
    configs/inference.* or configs/metadata.json, or the named run (no ``model.artifact``) has
    no model file that discovery takes but holds a bundle."""
    if source.path is not None:
        root = Path(str(source.path)).expanduser()
        markers = [root / marker for marker in _MARKERS]
        return root.is_dir() and any(marker.is_file() for marker in markers)
    if source.artifact or str(source.uri or "").startswith("models:/"):
        return False
    uri = str(source.tracking_uri or tracking_uri)
    try:
        client = client_for(uri, registry_uri=uri)
        run, artifact, _ = _locate_run(client, source, uri)
        if artifact is not None:
            return False
        run_id = run.info.run_id
        listed = client.list_artifacts(run_id, MODEL_FOLDER)
        if choose_model_artifact([i.path for i in listed if not i.is_dir], source.role):
            return False
        return bool(bundle_folders([f.path for f in _walk(client, run_id, _SEARCH_DEPTH, 100_000)]))
    except (MlflowException, OSError, SourceError):
        return False  # the model file's resolution reports what is wrong


def resolve_bundle(source: ModelConfig, tracking_uri: str, cache_dir: Path) -> ResolvedModel:
    """The bundle named by `source` (``model.path``, or a run and optionally ``model.artifact``),
    read and checked; a run named beside ``model.path`` still gives the training split."""
    if source.path is None and not (source.run_id or source.uri or source.run_name):
        raise SourceError("model=bundle: set model.path (a bundle folder) or model.run_id")
    uri = str(source.tracking_uri or tracking_uri)
    client = run = experiment = split_path = None
    folder, reason, downloaded = None, "model.path", False
    try:
        if source.run_id or source.uri or source.run_name:
            client = client_for(uri, registry_uri=uri)
            run, artifact, _ = _locate_run(client, source, uri)
            experiment = client.get_experiment(run.info.experiment_id).name
            split_path = _training_split(client, run, cache_dir, uri)
        if source.path is not None:
            root = Path(str(source.path)).expanduser().resolve()
        else:
            artifact = None if artifact is None else normalise_artifact_path(artifact)
            root, folder, reason, downloaded = _from_run(client, run, artifact, cache_dir, uri)
    except (MlflowException, OSError) as error:
        raise SourceError(
            f"cannot resolve the bundle (tracking URI {uri}): {first_line(error)}"
        ) from None
    bundle = read_bundle(root, trusted=bool(source.trust_bundle))
    contract = bundle_contract(bundle)
    run_id = run.info.run_id if run else None
    return ResolvedModel(
        local_path=root,
        sha256=bundle.sha256,
        artifact_uri=f"runs:/{run_id}/{folder}" if folder is not None else None,
        training_run_id=run_id,
        training_run_name=run.info.run_name if run else None,
        training_experiment=experiment,
        training_config=contract.training,
        downloaded=downloaded,
        artifact=folder,
        artifact_reason=f"MONAI bundle {reason}",
        training_split_path=split_path,
        split_version=run.data.tags.get(SPLIT_VERSION_TAG) if run else None,
        family="bundle",
        contents=ResolvedBundle(bundle, contract),
    )

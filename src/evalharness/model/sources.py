"""Find the training run through MLflow, fetch its model file (cached) and its training config.

:func:`resolve_model` finds the file and the training config through MLflow (run id,
``runs:/`` or ``models:/`` URI, experiment + run name) or takes a local ``model.path``; with
``model.artifact`` unset the model is discovered among the run's artifacts
(:mod:`evalharness.model.discovery`). The run's ``data/train_val_split.csv`` (fastMONAI's
record of what it trained and validated on) is fetched too when the run has one. Turning the
file into a network is :mod:`evalharness.model.loaders`' job. Every failure is a one-line
:class:`SourceError`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import FileInfo, Run
from mlflow.exceptions import MlflowException

from evalharness.config.rules import MODEL_RUN_KEYS
from evalharness.config.schema import ModelConfig
from evalharness.data.training_split import ARTIFACT as TRAINING_SPLIT_ARTIFACT
from evalharness.errors import SourceError, first_line
from evalharness.mlflow_client import client_for
from evalharness.model.discovery import (
    MODEL_FOLDER,
    ArtifactChoice,
    choose_model_artifact,
    looked_for,
    safetensors_sibling,
)
from evalharness.model.download_cache import build_once
from evalharness.model.training_config import (
    CONFIG_ARTIFACT_NAMES,
    TrainingConfig,
    fill_from_params,
    local_training_config,
    training_config_from_file,
    training_config_from_params,
    training_config_from_safetensors,
)

log = logging.getLogger(__name__)

SPLIT_VERSION_TAG = "split_version"  # fastMONAI's hash of the split's sample ids and roles
_CONFIG_SEARCH_DEPTH = 3  # artifact folder levels searched for patch_config.*
_LISTING_LIMIT = 20  # artifact paths named when an artifact is missing


@dataclass(frozen=True)
class ResolvedModel:
    """The model file on local disk, its provenance and the training side's config."""

    local_path: Path
    sha256: str
    artifact_uri: str | None  # runs:/<id>/<artifact path>; None for model.path
    training_run_id: str | None
    training_run_name: str | None
    training_experiment: str | None
    training_config: TrainingConfig
    downloaded: bool  # False when served from the cache (or a local model.path)
    notes: tuple[str, ...] = ()  # e.g. ambiguous run names, the registry version used
    artifact: str | None = None  # run-relative path of the model file; None for model.path
    artifact_reason: str = ""  # how the artifact was chosen (model.artifact, discovery, ...)
    sibling_metadata_path: Path | None = None  # safetensors giving a state dict's architecture
    training_split_path: Path | None = None  # the run's data/train_val_split.csv, if it has one
    split_version: str | None = None  # the run's `split_version` tag
    family: str | None = None  # None: a model file; "bundle": a MONAI bundle
    contents: Any = None  # what a family's source read; its `load()` gives the network


def normalise_artifact_path(path: str) -> str:
    """A run-relative artifact path, refusing anything that escapes the run's artifacts."""
    text = str(path).replace("\\", "/")
    norm = posixpath.normpath(text) if text else "."
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text) or "://" in text:
        raise SourceError(f"artifact path '{path}' must be relative to the run's artifacts")
    if norm in (".", "..") or norm.startswith("../"):
        raise SourceError(f"artifact path '{path}' escapes the run's artifacts")
    return norm


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _get_run(client: MlflowClient, run_id: str, uri: str) -> Run:
    try:
        return client.get_run(run_id)
    except (MlflowException, OSError) as error:
        if getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            raise SourceError(f"training run '{run_id}' not found at tracking URI {uri}") from None
        raise SourceError(f"cannot read run '{run_id}' from {uri}: {first_line(error)}") from None


def _walk(client: MlflowClient, run_id: str, depth: int, limit: int) -> list[FileInfo]:
    """Files among the run's artifacts, breadth first (top level first)."""
    files: list[FileInfo] = []
    level: list[str | None] = [None]
    for _ in range(depth):
        entries = [info for folder in level for info in client.list_artifacts(run_id, folder)]
        files += [info for info in entries if not info.is_dir]
        level = [info.path for info in entries if info.is_dir]
        if len(files) >= limit or not level:
            break
    return files[:limit]


def _artifact_info(client: MlflowClient, run_id: str, artifact: str) -> FileInfo:
    for info in client.list_artifacts(run_id, posixpath.dirname(artifact) or None):
        if info.path == artifact and not info.is_dir:
            return info
    existing = [info.path for info in _walk(client, run_id, 8, _LISTING_LIMIT)]
    has = ", ".join(existing) or "no artifacts"
    raise SourceError(f"run '{run_id}' has no artifact file '{artifact}' (it has: {has})")


def _fetch(
    client: MlflowClient, run: Run, artifact: str, cache_dir: Path, uri: str
) -> tuple[Path, str, bool]:
    """Download ``artifact`` once into ``cache_dir``; returns (path, sha256, downloaded).

    Entries are keyed by run id + artifact path + size + the run's end time, so repeated
    resolves (in one process or many) share one download. A file lock serialises the first
    download; the entry folder appears by atomic rename, complete with its checksum.
    """
    run_id = run.info.run_id
    info = _artifact_info(client, run_id, artifact)
    key = hashlib.sha256(f"{artifact}\n{info.file_size}\n{run.info.end_time}".encode())
    entry = Path(cache_dir) / run_id / key.hexdigest()[:16]
    downloaded = build_once(
        entry, lambda staging: _download(run_id, artifact, info.file_size, staging, uri)
    )
    sha = (entry / "sha256").read_text().strip()
    return entry / posixpath.basename(artifact), sha, downloaded


def _download(run_id: str, artifact: str, size: int | None, staging: Path, uri: str) -> Path:
    """``staging/entry``: the artifact (its size checked) and its sha256."""
    fetched = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=artifact, dst_path=str(staging / "download"), tracking_uri=uri
    )
    if size is not None and os.path.getsize(fetched) != size:
        raise SourceError(f"download of '{artifact}' (run '{run_id}') is not {size} bytes long")
    kept = staging / "entry" / posixpath.basename(artifact)
    kept.parent.mkdir()
    shutil.move(fetched, kept)
    (kept.parent / "sha256").write_text(_sha256(kept))
    return kept.parent


def _split_runs_uri(uri: str) -> tuple[str, str]:
    run_id, _, artifact = uri.removeprefix("runs:/").strip("/").partition("/")
    if not run_id or not artifact:
        raise SourceError(f"'{uri}' must look like runs:/<run id>/<artifact path>")
    return run_id, artifact


def _registered_version(client: MlflowClient, uri: str, tracking_uri: str) -> tuple[str, str, str]:
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>`` -> (run id, artifact, note)."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([\w\-]+))", uri)
    if not match:
        raise SourceError(
            f"model.uri '{uri}' must be runs:/<id>/<path>, models:/<name>/<version> "
            "or models:/<name>@<alias>"
        )
    name, version, alias = match.groups()
    try:
        if alias:
            found = client.get_model_version_by_alias(name, alias)
        else:
            found = client.get_model_version(name, version)
    except MlflowException as error:
        message = f"model.uri '{uri}' not found at {tracking_uri}: {first_line(error)}"
        raise SourceError(message) from None
    source, run_id = str(found.source), found.run_id or ""
    if source.startswith("runs:/"):
        source_run, artifact = _split_runs_uri(source)
    else:  # an absolute URI inside the run's artifact root
        root = _get_run(client, run_id, tracking_uri).info.artifact_uri if run_id else ""
        prefix = root.removeprefix("file://").rstrip("/") + "/"
        path = source.removeprefix("file://")
        source_run, artifact = run_id, path[len(prefix) :] if path.startswith(prefix) else ""
    if not run_id or source_run != run_id or not artifact:
        raise SourceError(f"model.uri '{uri}': its source {source} is not a file of a run")
    return run_id, artifact, f"{uri} is version {found.version} ({source})"


def _find_run_by_name(
    client: MlflowClient, experiment: str, run_name: str, uri: str
) -> tuple[str, list[str]]:
    """The most recent FINISHED run called ``run_name`` in ``experiment``."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SourceError(f"experiment '{experiment}' not found at tracking URI {uri}")
    quote = '"' if "'" in run_name else "'"
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"attributes.run_name = {quote}{run_name}{quote}",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    finished = [r.info.run_id for r in runs if r.info.status == "FINISHED"]
    if not finished:
        statuses = ", ".join(sorted({r.info.status for r in runs})) or "no runs"
        raise SourceError(
            f"no FINISHED run named '{run_name}' in experiment '{experiment}' at {uri} "
            f"(found: {statuses})"
        )
    if len(finished) == 1:
        return finished[0], []
    note = (
        f"{len(finished)} FINISHED runs are named '{run_name}' in '{experiment}'; "
        f"using the most recent, {finished[0]}"
    )
    log.warning(note)
    return finished[0], [note]


def _training_config(
    client: MlflowClient | None,
    run: Run | None,
    config_artifact: str | None,
    model_path: Path,
    cache_dir: Path,
    uri: str,
) -> TrainingConfig:
    """First found wins: patch_config.pkl, patch_config.json, safetensors metadata, params;
    fields it lacks are then filled from the run's params (``patch_*``, ``size``,
    ``target_spacing``, ``apply_reorder``, ``transformations``), each field's source recorded.

    The safetensors ``output`` block (activation, decision) is attached whichever wins.
    """
    from_safetensors = training_config_from_safetensors(model_path)
    output = from_safetensors.output
    if run is None or client is None:
        return local_training_config(model_path, config_artifact, from_safetensors)
    if config_artifact is not None:
        name = normalise_artifact_path(config_artifact)
        if not name.endswith((".pkl", ".json")):
            raise SourceError(f"model.config_artifact '{name}' must be a .pkl or .json file")
    else:
        found = [
            info.path
            for info in _walk(client, run.info.run_id, _CONFIG_SEARCH_DEPTH, 10_000)
            if posixpath.basename(info.path) in CONFIG_ARTIFACT_NAMES
        ]
        found.sort(key=lambda p: CONFIG_ARTIFACT_NAMES.index(posixpath.basename(p)))
        name = found[0] if found else None
    params = run.data.params
    if name is not None:
        local, _, _ = _fetch(client, run, name, cache_dir, uri)
        return fill_from_params(
            replace(training_config_from_file(local, name), output=output), params
        )
    if from_safetensors.source != "none":
        return fill_from_params(from_safetensors, params)
    return fill_from_params(replace(training_config_from_params(params), output=output), params)


def _locate_run(
    client: MlflowClient, source: ModelConfig, uri: str
) -> tuple[Run, str | None, list[str]]:
    """The training run, the model's artifact path in it (None: to be discovered), and notes
    on how they were chosen."""
    artifact = source.artifact or None
    notes: list[str] = []
    run_id = source.run_id
    model_uri = str(source.uri or "")
    if model_uri.startswith("runs:/"):
        run_id, artifact = _split_runs_uri(model_uri)
    elif model_uri:
        run_id, artifact, note = _registered_version(client, model_uri, uri)
        notes.append(note)
    elif source.run_name:
        experiment = source.experiment
        if not experiment:
            raise SourceError("model.run_name needs model.experiment")
        run_id, notes = _find_run_by_name(client, experiment, source.run_name, uri)
    run = _get_run(client, str(run_id), uri)
    return run, None if artifact is None else normalise_artifact_path(artifact), notes


def discover_model(client: MlflowClient, run_id: str, role: str = "best") -> ArtifactChoice:
    """The model artifact of run `run_id` by the discovery order for `role`
    (:mod:`evalharness.model.discovery`); SourceError listing the run's files when none fits."""
    listed = client.list_artifacts(run_id, MODEL_FOLDER)
    choice = choose_model_artifact([info.path for info in listed if not info.is_dir], role)
    if choice is None:
        has = ", ".join(info.path for info in _walk(client, run_id, 8, _LISTING_LIMIT))
        has = has or "no artifacts"
        raise SourceError(
            f"run '{run_id}' has no loadable model file (looked for {looked_for(role)}; "
            f"it has: {has})"
        )
    return choice


def _explicit_choice(client: MlflowClient, run_id: str, artifact: str, how: str) -> ArtifactChoice:
    """An artifact named by the user, with a safetensors sibling when it needs an architecture."""
    folder = posixpath.dirname(artifact) or None
    paths = [info.path for info in client.list_artifacts(run_id, folder) if not info.is_dir]
    return ArtifactChoice(artifact, safetensors_sibling(paths, artifact), how)


def _training_split(client: MlflowClient, run: Run, cache_dir: Path, uri: str) -> Path | None:
    """The run's data/train_val_split.csv, downloaded (cached), or None when it has none."""
    folder = posixpath.dirname(TRAINING_SPLIT_ARTIFACT)
    listed = {info.path for info in client.list_artifacts(run.info.run_id, folder)}
    if TRAINING_SPLIT_ARTIFACT not in listed:
        return None
    return _fetch(client, run, TRAINING_SPLIT_ARTIFACT, cache_dir, uri)[0]


def resolve_model(source: ModelConfig, tracking_uri: str, cache_dir: Path) -> ResolvedModel:
    """Locate the model file and the training config described by `source` (the ``model`` config).

    The run is named by one of ``run_id``, ``uri`` or ``experiment`` + ``run_name``, read
    from ``source.tracking_uri`` if set, else ``tracking_uri``; ``path`` takes the model
    file from local disk instead of the run's ``artifact`` (the run still gives the config).
    Downloads are cached in ``cache_dir`` (``downloaded`` says whether this call fetched).
    With no ``artifact`` (and no ``uri``) the model is discovered for ``role`` (best|final).
    """
    chosen = [key for key in MODEL_RUN_KEYS if getattr(source, key)]
    local = source.path
    if not chosen and not local:
        raise SourceError("model: set one of path, run_id, uri or experiment + run_name")
    uri = str(source.tracking_uri or tracking_uri)
    client = run = experiment = choice = sibling = split_path = None
    notes: list[str] = []
    try:
        if chosen:
            client = client_for(uri, registry_uri=uri)
            run, artifact, notes = _locate_run(client, source, uri)
            experiment = client.get_experiment(run.info.experiment_id).name
            split_path = _training_split(client, run, cache_dir, uri)
        if local:
            model_path, artifact_uri = Path(local).expanduser().resolve(), None
            if not model_path.is_file():
                raise SourceError(f"model.path: file not found: {model_path}")
            sha, downloaded = _sha256(model_path), False
        else:
            run_id = run.info.run_id
            if artifact is None:
                choice = discover_model(client, run_id, source.role)
            else:
                how = "model.uri" if source.uri else "model.artifact"
                choice = _explicit_choice(client, run_id, artifact, how)
            model_path, sha, downloaded = _fetch(client, run, choice.artifact, cache_dir, uri)
            if choice.sibling is not None:
                sibling = _fetch(client, run, choice.sibling, cache_dir, uri)[0]
            artifact_uri = f"runs:/{run_id}/{choice.artifact}"
        config_artifact = source.config_artifact
        config = _training_config(
            client, run, config_artifact, sibling or model_path, cache_dir, uri
        )
    except (MlflowException, OSError) as error:  # what the specific checks did not foresee
        raise SourceError(
            f"cannot resolve the model (tracking URI {uri}): {first_line(error)}"
        ) from None
    return ResolvedModel(
        local_path=model_path,
        sha256=sha,
        artifact_uri=artifact_uri,
        training_run_id=run.info.run_id if run else None,
        training_run_name=run.info.run_name if run else None,
        training_experiment=experiment,
        training_config=config,
        downloaded=downloaded,
        notes=tuple(notes),
        artifact=choice.artifact if choice else None,
        artifact_reason=choice.reason if choice else "model.path",
        sibling_metadata_path=sibling,
        training_split_path=split_path,
        split_version=run.data.tags.get(SPLIT_VERSION_TAG) if run else None,
    )

"""An nnU-Net model folder among an MLflow run's artifacts, found by its content.

A training run may log the trained model folder anywhere in its artifacts; it is the folder
holding ``plans.json``, ``dataset.json`` and ``fold_*/checkpoint_*.pth`` (``model.artifact``
names it when a run holds several). It is downloaded once into the model cache (keyed by run,
folder and the run's end time, under a file lock) with a ``splits_final.json`` the run logged.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from evalharness.errors import SourceError, first_line
from evalharness.mlflow_client import client_for
from evalharness.model.download_cache import build_once
from evalharness.model.nnunet import SPLITS, is_model_folder

_DEPTH = 8  # artifact folder levels searched


@dataclass(frozen=True)
class RunFolder:
    """A model folder downloaded from a run, and where it came from."""

    folder: Path
    splits: Path | None
    run_id: str
    run_name: str | None
    experiment: str | None
    artifact: str  # the folder's run-relative path
    downloaded: bool


def _files(client: mlflow.MlflowClient, run_id: str) -> list[str]:
    """Every artifact file path of the run (breadth first, `_DEPTH` levels)."""
    files: list[str] = []
    level: list[str | None] = [None]
    for _ in range(_DEPTH):
        entries = [info for folder in level for info in client.list_artifacts(run_id, folder)]
        files += [info.path for info in entries if not info.is_dir]
        level = [info.path for info in entries if info.is_dir]
        if not level:
            break
    return files


def model_folders(files: list[str]) -> list[str]:
    """The run-relative folders among `files` that hold an nnU-Net model folder."""
    folders = sorted({posixpath.dirname(f) for f in files if posixpath.basename(f) == "plans.json"})
    found = []
    for folder in folders:
        prefix = f"{folder}/" if folder else ""
        inside = [f[len(prefix) :] for f in files if f.startswith(prefix)]
        if is_model_folder(inside):
            found.append(folder)
    return found


def _download(run_id: str, artifact: str, entry: Path, uri: str) -> bool:
    """`artifact` (a folder or file) into `entry` once; whether this call downloaded it."""

    def fetch(staging: Path) -> Path:
        return Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact, dst_path=str(staging), tracking_uri=uri
            )
        )

    return build_once(entry, fetch)


def fetch_run_folder(
    run_id: str, tracking_uri: str, cache_dir: Path, artifact: str | None = None
) -> RunFolder:
    """Find the model folder among run `run_id`'s artifacts (or take `artifact`), download it
    and a ``splits_final.json`` the run holds; one `SourceError` line when there is none or
    several."""
    client = client_for(tracking_uri, registry_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
        files = _files(client, run_id)
    except (MlflowException, OSError) as error:
        raise SourceError(
            f"model.run_id={run_id}: cannot read the run at {tracking_uri} ({first_line(error)})"
        ) from None
    folders = model_folders(files)
    if artifact is not None:
        folders = [f for f in folders if f == artifact.strip("/")]
    if len(folders) != 1:
        has = ", ".join(folders) if folders else ", ".join(files[:20]) or "no artifacts"
        what = "several nnU-Net model folders (set model.artifact)" if folders else "no folder"
        raise SourceError(
            f"run '{run_id}' holds {what} with plans.json, dataset.json and "
            f"fold_*/checkpoint_*.pth (it has: {has})"
        )
    folder = folders[0]
    key = hashlib.sha256(f"{folder}\n{run.info.end_time}".encode()).hexdigest()[:16]
    base = Path(cache_dir) / run_id / f"nnunet-{key}"
    local = base / (posixpath.basename(folder) or "model")  # keeps <trainer>__<plans>__<config>
    downloaded = _download(run_id, folder or ".", local, tracking_uri)
    splits = sorted((f for f in files if posixpath.basename(f) == SPLITS), key=len)
    splits_path = None
    if splits:
        _download(run_id, splits[0], base / SPLITS, tracking_uri)
        splits_path = base / SPLITS
    experiment = client.get_experiment(run.info.experiment_id).name
    return RunFolder(local, splits_path, run_id, run.info.run_name, experiment, folder, downloaded)

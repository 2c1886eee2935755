"""The embedded demo: a synthetic dataset and a tiny 3D U-Net, logged as a training run.

`ensure_demo` builds (once, cached) a small Decathlon-style dataset with
`evalharness.demo.synthetic`, trains a MONAI U-Net on it on the CPU and logs the result to an MLflow
store (`evalharness.demo.training_run`) laid out as a fastMONAI patch training run is:

- artifact ``model/best_learner.pkl``: ``torch.save`` of the whole network (a
  ``monai.networks.nets.UNet``; unpickling it needs nothing outside torch and MONAI),
- artifacts ``patch_config.pkl`` (pickled dict) and ``patch_config.json`` with fastMONAI's
  ``PatchConfig`` fields, and ``split.csv`` (``image,label,split``),
- params ``patch_<field>`` for each field plus ``target_spacing`` and ``apply_reorder``,
- metrics ``train_loss`` and ``train_dsc`` per epoch, tag ``evalharness.kind=demo-training``.

Training (`evalharness.demo.training`) deliberately uses none of the harness's own
preprocessing code, so evaluating the demo run honestly tests the harness.

Cache layout under ``cache_dir`` (one folder per spec, so DEMO and TINY can coexist)::

    .demo.lock                      file lock: one process builds or logs at a time
    demo-<spec hash>/
        data/                       dataset.json, imagesTr/, labelsTr/, split.csv
        model/best_learner.pkl
        patch_config.json, patch_config.pkl, train_history.json
        demo.json                   marker: spec, model sha256, run id per tracking URI

A spec folder is built in a temporary sibling folder and renamed into place, so a folder with a
marker is always complete. Calls with a store that already holds the demo run return that run;
calls with another store (or one whose run was deleted) log the cached model as a new run
without retraining.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from filelock import FileLock, Timeout

from evalharness.demo.spec import DEMO, DemoSpec
from evalharness.demo.synthetic import write_decathlon_dataset
from evalharness.demo.training import LABEL_PROBABILITIES, train_model
from evalharness.demo.training_run import log_training_run, run_is_usable
from evalharness.track import tracking

DEFAULT_EXPERIMENT = "evalharness-demo-training"
MARKER_NAME = "demo.json"
MARKER_VERSION = 1


@dataclass(frozen=True)
class DemoTraining:
    """The demo's training run and the data it was trained on."""

    run_id: str | None
    """The training run in the store (None: not asked for, `ensure_demo`'s ``with_run``)."""
    data_root: Path
    """Decathlon folder (dataset.json, imagesTr/, labelsTr/) plus split.csv."""
    split_file: Path
    """CSV with columns image,label,split (split = train|test), like fastMONAI's split.csv."""


def patch_config(spec: DemoSpec) -> dict[str, Any]:
    """fastMONAI ``PatchConfig`` of the demo model, as a plain dict (what the run logs)."""
    return {
        "patch_size": list(spec.patch_size),
        "patch_overlap": 0.5,
        "aggregation_mode": "hann",
        "apply_reorder": True,
        "target_spacing": list(spec.target_spacing_mm),
        "sampler_type": "label",
        "label_probabilities": dict(LABEL_PROBABILITIES),
        "samples_per_volume": spec.samples_per_volume,
        "queue_length": spec.samples_per_volume * (spec.n_cases - spec.n_test),
        "queue_num_workers": 0,
        "padding_mode": 0,
        "keep_largest_component": True,
        "binary_threshold": 0.5,
        "normalization": [{"name": "ZNormalization", "masking_method": None, "channel_wise": True}],
    }


def ensure_demo(
    cache_dir: Path,
    tracking_uri: str,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    spec: DemoSpec = DEMO,
    with_run: bool = True,
) -> DemoTraining:
    """Build (once) the demo dataset and model, and make sure `tracking_uri` holds its run
    (unless not `with_run`: an evaluation of another model only needs the data).

    Args:
        cache_dir: folder for the cached data and model (created if missing).
        tracking_uri: MLflow tracking URI (``sqlite:////abs/mlflow.db``,
            ``file:///abs/mlruns``; the file store needs ``MLFLOW_ALLOW_FILE_STORE=true``).
            A local store's relative path is made absolute first. First use of a local store
            is serialised by a file lock ``<database or store folder>.lock`` beside it.
        experiment: experiment that holds the training run (created if missing; with a SQLite
            store its artifacts go to ``mlartifacts/`` next to the database file).
        spec: sizes of the demo (`DEMO`, or `TINY` for tests).

    Returns:
        The run id and where the data and split lie. Safe to call from several processes at
        once: a file lock in `cache_dir` serialises building and logging.
    """
    cache_dir = Path(cache_dir).absolute()
    tracking_uri = tracking.absolute_tracking_uri(tracking_uri)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir / ".demo.lock", "another process is building the demo"):
        build_dir = cache_dir / f"demo-{spec.key()}"
        marker = _read_valid_marker(build_dir, spec)
        if marker is None:
            _discard_stale(cache_dir, build_dir)
            _build(build_dir, spec)
            marker = _read_valid_marker(build_dir, spec)
            if marker is None:  # pragma: no cover - a bug, not a user error
                raise RuntimeError(f"demo build in {build_dir} left no valid marker")
        run_id = None
        if with_run:
            run_id = _ensure_run(build_dir, marker, tracking_uri, experiment, spec)
    data_root = build_dir / "data"
    return DemoTraining(run_id=run_id, data_root=data_root, split_file=data_root / "split.csv")


# ---------------------------------------------------------------------------------------------
# Cache


def _progress(message: str) -> None:
    print(f"[evalharness demo] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(path: Path, waiting_message: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _progress(f"{waiting_message}; waiting for {path}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_valid_marker(build_dir: Path, spec: DemoSpec) -> dict[str, Any] | None:
    """The marker of a complete build of `spec` in `build_dir`, or None."""
    try:
        marker = json.loads((build_dir / MARKER_NAME).read_text())
        complete = (
            marker.get("version") == MARKER_VERSION
            and marker.get("spec") == spec.to_dict()
            and _sha256(build_dir / "model" / "best_learner.pkl") == marker.get("model_sha256")
            and (build_dir / "data" / "split.csv").is_file()
        )
    except (OSError, ValueError):
        return None
    return marker if complete else None


def _write_json_atomic(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _discard_stale(cache_dir: Path, build_dir: Path) -> None:
    """Remove an incomplete `build_dir` and half-built folders of earlier, killed builds.

    Only called with the cache lock held, so no other process is building right now.
    """
    for stale in [build_dir, *cache_dir.glob(".build-*")]:
        if stale.exists():
            shutil.rmtree(stale)


def _build(build_dir: Path, spec: DemoSpec) -> None:
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(dir=build_dir.parent, prefix=".build-"))
    try:
        data_root = tmp / "data"
        _progress(f"writing a synthetic dataset of {spec.n_cases} cases")
        write_decathlon_dataset(
            data_root, spec.n_cases, seed=spec.seed, field_of_view_mm=spec.field_of_view_mm
        )
        split = write_split(data_root, spec.n_test)
        train_rows = split[split["split"] == "train"]
        _progress(f"preprocessing {len(train_rows)} training cases")
        history, model = train_model(
            [data_root / p for p in train_rows["image"]],
            [data_root / p for p in train_rows["label"]],
            spec,
        )
        (tmp / "model").mkdir()
        model_path = tmp / "model" / "best_learner.pkl"
        torch.save(model, model_path)
        config = patch_config(spec)
        (tmp / "patch_config.json").write_text(json.dumps(config, indent=2))
        with (tmp / "patch_config.pkl").open("wb") as f:
            pickle.dump(config, f)
        (tmp / "train_history.json").write_text(json.dumps(history, indent=2))
        marker = {
            "version": MARKER_VERSION,
            "spec": spec.to_dict(),
            "model_sha256": _sha256(model_path),
            "build_seconds": round(time.perf_counter() - started, 1),
            "runs": {},
        }
        _write_json_atomic(tmp / MARKER_NAME, marker)
        os.rename(tmp, build_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _progress(f"demo built in {time.perf_counter() - started:.0f} s: {build_dir}")


def write_split(data_root: Path, n_test: int) -> pd.DataFrame:
    """Write ``split.csv`` (image,label,split) for the dataset in `data_root` and return it.

    As fastMONAI's tutorials do: ``train_test_split`` over the ``dataset.json`` training list in
    file order with ``random_state=42``; rows are the train cases, then the test cases.
    """
    from sklearn.model_selection import train_test_split

    entries = pd.DataFrame(json.loads((data_root / "dataset.json").read_text())["training"])
    train, test = train_test_split(entries, test_size=n_test, random_state=42)
    split = pd.concat([train.assign(split="train"), test.assign(split="test")])
    split = split[["image", "label", "split"]].reset_index(drop=True)
    split.to_csv(data_root / "split.csv", index=False)
    return split


def _ensure_run(
    build_dir: Path, marker: dict[str, Any], tracking_uri: str, experiment: str, spec: DemoSpec
) -> str:
    """Run id of the demo training run in `tracking_uri`, logging it if the store lacks it."""
    client = tracking.prepare_store(tracking_uri)
    known = marker.get("runs", {}).get(tracking_uri, {}).get(experiment)
    if run_is_usable(client, known, experiment, marker["model_sha256"]):
        _progress(f"reusing training run {known} in {tracking_uri}")
        return known
    run_id = log_training_run(
        client, tracking_uri, build_dir, marker["model_sha256"], experiment, spec
    )
    _progress(f"logged training run {run_id} in {tracking_uri} (experiment {experiment!r})")
    marker.setdefault("runs", {}).setdefault(tracking_uri, {})[experiment] = run_id
    _write_json_atomic(build_dir / MARKER_NAME, marker)
    return run_id

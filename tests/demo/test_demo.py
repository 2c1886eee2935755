"""The embedded demo: TINY builds, the logged run's layout, the cache and its locking."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from conftest import sqlite_store
from mlflow import MlflowClient
from monai.networks.nets import UNet
from sklearn.model_selection import train_test_split

from evalharness.demo import build as demo
from evalharness.demo import training_run as demo_run
from evalharness.demo.build import DemoTraining, ensure_demo
from evalharness.demo.spec import DEMO, TINY, DemoSpec
from evalharness.demo.synthetic import DEMO_SPACINGS_MM
from evalharness.model.training_config import PATCH_CONFIG_FIELDS

SRC = Path(demo.__file__).resolve().parents[2]
PATCH_FIELDS = (*PATCH_CONFIG_FIELDS, "sampler_type", "samples_per_volume")


def sqlite_uri_of(path: Path) -> str:
    return f"sqlite:///{path.absolute()}"


@pytest.fixture(params=["sqlite", "file"])
def store_uri(request, tmp_path, monkeypatch, migrated_sqlite) -> str:
    if request.param == "file":
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        return (tmp_path / "file-store").absolute().as_uri()
    return sqlite_store(migrated_sqlite, tmp_path / "store" / "mlflow.db")


@pytest.fixture(scope="module")
def built(tmp_path_factory, migrated_sqlite) -> tuple[Path, str, DemoTraining]:
    """One TINY demo, built once for the cache tests: (cache_dir, tracking URI, result)."""
    root = tmp_path_factory.mktemp("built")
    uri = sqlite_store(migrated_sqlite, root / "first" / "mlflow.db")
    return root / "cache", uri, ensure_demo(root / "cache", uri, spec=TINY)


@pytest.fixture
def no_training(monkeypatch):
    """Make any attempt to train fail the test."""

    def fail(*args, **kwargs):
        raise AssertionError("the demo model was trained again")

    monkeypatch.setattr(demo, "train_model", fail)


def build_dir(result: DemoTraining) -> Path:
    return result.data_root.parent


def runs_in(uri: str, experiment: str = demo.DEFAULT_EXPERIMENT) -> list:
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def test_specs_are_valid_and_demo_resamples_every_case():
    for spec in (DEMO, TINY):
        assert 1 <= spec.n_test < spec.n_cases
        assert all(p % 2 ** len(spec.strides) == 0 for p in spec.patch_size)
    # the demo only tests resampling if no case already lies on the training grid
    for spacing in DEMO_SPACINGS_MM:
        assert tuple(spacing) != DEMO.target_spacing_mm
    assert TINY.key() != DEMO.key()
    with pytest.raises(ValueError, match="divisible"):
        DemoSpec(4, 1, (48.0, 48.0, 24.0), (1.5, 1.5, 1.5), (10, 16, 16), (4, 8, 16), 1)
    with pytest.raises(ValueError, match="n_test"):
        DemoSpec(2, 2, (48.0, 48.0, 24.0), (1.5, 1.5, 1.5), (16, 16, 16), (4, 8), 1)


def test_tiny_demo_builds_and_logs_a_fastmonai_like_run(store_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow must not put artifacts in the working directory
    cache = tmp_path / "cache"
    # leftovers of a killed build: a half-built temp folder and a spec folder with no marker
    (cache / ".build-killed").mkdir(parents=True)
    (cache / f"demo-{TINY.key()}" / "data").mkdir(parents=True)

    result = ensure_demo(cache, store_uri, spec=TINY)

    assert not list(cache.glob(".build-*"))
    assert not (tmp_path / "mlruns").exists()
    assert result.split_file == result.data_root / "split.csv"
    dataset = json.loads((result.data_root / "dataset.json").read_text())
    assert len(dataset["training"]) == TINY.n_cases

    # split.csv: fastMONAI's columns, train_test_split(file order, random_state=42)
    split = pd.read_csv(result.split_file)
    assert list(split.columns) == ["image", "label", "split"]
    expected_train, expected_test = train_test_split(
        [e["image"] for e in dataset["training"]], test_size=TINY.n_test, random_state=42
    )
    assert list(split.loc[split.split == "test", "image"]) == expected_test
    assert list(split.loc[split.split == "train", "image"]) == expected_train
    for column in ("image", "label"):
        assert all((result.data_root / p).is_file() for p in split[column])

    client = MlflowClient(tracking_uri=store_uri)
    run = client.get_run(result.run_id)
    assert run.info.run_name == "demo-training"
    assert run.info.status == "FINISHED"
    assert run.data.tags["evalharness.kind"] == "demo-training"
    assert client.get_experiment(run.info.experiment_id).name == "evalharness-demo-training"

    root_artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"model", "patch_config.pkl", "patch_config.json", "split.csv"} <= root_artifacts
    model_artifacts = {a.path for a in client.list_artifacts(result.run_id, "model")}
    assert "model/best_learner.pkl" in model_artifacts

    local = Path(
        mlflow.artifacts.download_artifacts(
            run_id=result.run_id, tracking_uri=store_uri, dst_path=str(tmp_path / "dl")
        )
    )
    model = torch.load(local / "model" / "best_learner.pkl", weights_only=False)
    assert isinstance(model, UNet)
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 1, *TINY.patch_size))
    assert out.shape == (1, 2, *TINY.patch_size)

    with (local / "patch_config.pkl").open("rb") as f:
        config = pickle.load(f)
    assert isinstance(config, dict)
    as_json = json.loads((local / "patch_config.json").read_text())
    assert set(config) == set(as_json)
    assert set(PATCH_FIELDS) <= set(config)
    assert config["patch_size"] == list(TINY.patch_size) == as_json["patch_size"]
    assert config["target_spacing"] == list(TINY.target_spacing_mm) == as_json["target_spacing"]
    assert config["patch_overlap"] == 0.5
    assert config["aggregation_mode"] == "hann"
    assert config["apply_reorder"] is True
    assert config["padding_mode"] == 0
    assert config["keep_largest_component"] is True
    assert config["binary_threshold"] == 0.5
    assert config["normalization"] == [
        {"name": "ZNormalization", "masking_method": None, "channel_wise": True}
    ]
    assert pd.read_csv(local / "split.csv").equals(split)

    params = run.data.params
    for field in config:
        assert f"patch_{field}" in params
    assert params["patch_aggregation_mode"] == "hann"
    assert params["target_spacing"] == str(list(TINY.target_spacing_mm))
    assert params["apply_reorder"] == "True"
    losses = client.get_metric_history(result.run_id, "train_loss")
    assert [m.step for m in losses] == list(range(TINY.epochs))


def test_same_store_reuses_the_run_without_training(built, no_training):
    cache, uri, first = built
    model_file = build_dir(first) / "model" / "best_learner.pkl"
    mtime = model_file.stat().st_mtime_ns

    again = ensure_demo(cache, uri, spec=TINY)

    assert again == first
    assert model_file.stat().st_mtime_ns == mtime
    assert [r.info.run_id for r in runs_in(uri)] == [first.run_id]


def test_new_store_gets_a_new_run_from_the_cache(
    built, no_training, tmp_path, monkeypatch, migrated_sqlite
):
    cache, uri, first = built
    marker_path = build_dir(first) / demo.MARKER_NAME
    sha = json.loads(marker_path.read_text())["model_sha256"]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    other_sqlite = sqlite_store(migrated_sqlite, tmp_path / "other.db")
    other_uris = [other_sqlite, (tmp_path / "mlruns").absolute().as_uri()]

    results = [ensure_demo(cache, other, spec=TINY) for other in other_uris]

    for other, result in zip(other_uris, results, strict=True):
        assert result.run_id != first.run_id
        assert result.data_root == first.data_root
        (run,) = runs_in(other)
        assert run.info.run_id == result.run_id
        assert run.data.tags[demo_run.MODEL_SHA_TAG] == sha
    marker = json.loads(marker_path.read_text())
    assert marker["model_sha256"] == sha
    runs = marker["runs"]
    assert runs[uri][demo.DEFAULT_EXPERIMENT] == first.run_id
    for other, result in zip(other_uris, results, strict=True):
        assert runs[other][demo.DEFAULT_EXPERIMENT] == result.run_id
    # and each store keeps its own run on the next call
    assert ensure_demo(cache, other_uris[0], spec=TINY) == results[0]
    assert ensure_demo(cache, uri, spec=TINY) == first


def test_deleted_run_is_logged_again(built, no_training, tmp_path, migrated_sqlite):
    cache, _, _ = built
    uri = sqlite_store(migrated_sqlite, tmp_path / "mlflow.db")
    first = ensure_demo(cache, uri, spec=TINY)
    MlflowClient(tracking_uri=uri).delete_run(first.run_id)

    second = ensure_demo(cache, uri, spec=TINY)

    assert second.run_id != first.run_id
    assert [r.info.run_id for r in runs_in(uri)] == [second.run_id]


def test_deleted_store_is_logged_again_without_training(built, tmp_path):
    cache, _, _ = built
    db = tmp_path / "mlflow.db"
    uri = sqlite_uri_of(db)
    first = ensure_demo(cache, uri, spec=TINY)
    model_file = build_dir(first) / "model" / "best_learner.pkl"
    mtime = model_file.stat().st_mtime_ns
    db.unlink()

    # MLflow caches open stores per process: a store deleted between two runs of the CLI
    (second,) = run_in_processes(cache, uri, 1)

    assert second.run_id != first.run_id
    # (read the new file directly: this process's MLflow still holds the deleted one open)
    with contextlib.closing(sqlite3.connect(db)) as connection:
        run_ids = [row[0] for row in connection.execute("SELECT run_uuid FROM runs")]
    assert run_ids == [second.run_id]
    assert model_file.stat().st_mtime_ns == mtime  # not retrained


def test_other_experiment_in_the_same_store_gets_its_own_run(built, no_training):
    cache, uri, first = built
    other = ensure_demo(cache, uri, spec=TINY, experiment="another-demo")
    assert other.run_id != first.run_id
    assert [r.info.run_id for r in runs_in(uri, "another-demo")] == [other.run_id]
    assert ensure_demo(cache, uri, spec=TINY) == first


def test_failed_build_leaves_no_partial_cache(tmp_path, monkeypatch, migrated_sqlite):
    def broken(*args, **kwargs):
        raise RuntimeError("training exploded")

    monkeypatch.setattr(demo, "train_model", broken)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="exploded"):
        ensure_demo(cache, sqlite_store(migrated_sqlite, tmp_path / "mlflow.db"), spec=TINY)
    assert not list(cache.glob("demo-*"))
    assert not list(cache.glob(".build-*"))


def run_in_processes(cache: Path, uri: str, n: int) -> list[DemoTraining]:
    """Call ensure_demo(cache, uri, spec=TINY) in `n` concurrent fresh processes."""
    script = textwrap.dedent(
        f"""
        import json
        from evalharness.demo import build as demo
        from evalharness.demo.spec import TINY
        result = demo.ensure_demo({str(cache)!r}, {uri!r}, spec=TINY)
        print("RESULT " + json.dumps([result.run_id, str(result.data_root)]))
        """
    )
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(n)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]
        line = next(x for x in out.decode().splitlines() if x.startswith("RESULT "))
        run_id, data_root = json.loads(line.removeprefix("RESULT "))
        data_root = Path(data_root)
        results.append(DemoTraining(run_id, data_root, data_root / "split.csv"))
    return results


def test_concurrent_processes_share_one_build_and_one_run(tmp_path):
    cache, uri = tmp_path / "cache", sqlite_uri_of(tmp_path / "mlflow.db")

    first, second = run_in_processes(cache, uri, 2)

    assert first == second
    assert [r.info.run_id for r in runs_in(uri)] == [first.run_id]
    assert len(list(cache.glob("demo-*"))) == 1
    assert not list(cache.glob(".build-*"))
    marker = json.loads((build_dir(first) / demo.MARKER_NAME).read_text())
    assert marker["runs"] == {uri: {demo.DEFAULT_EXPERIMENT: first.run_id}}

"""MLflow resolution against real stores holding the real fastMONAI files."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import FIXTURE, sqlite_store
from mlflow import MlflowClient

from evalharness.config.schema import ModelConfig, from_mapping
from evalharness.errors import SourceError
from evalharness.mlflow_client import HTTP_DEFAULTS
from evalharness.model.loaders import load_model_file
from evalharness.model.sources import normalise_artifact_path, resolve_model

RUN = FIXTURE / "training_run"
LEARNER = RUN / "model" / "best_learner.pkl"
SAFETENSORS = RUN / "model" / "best_model.safetensors"
PARAMS = {"patch_patch_size": "[64, 64, 64]", "patch_target_spacing": "[1.0, 1.0, 1.0]"}


def resolve(values: dict, tracking_uri: str, cache_dir: Path):
    """`resolve_model` of the ``model`` config `values` (absent keys take their defaults)."""
    return resolve_model(from_mapping(ModelConfig, values), tracking_uri, cache_dir)


@dataclass(frozen=True)
class Store:
    """A tracking store with the fixture logged as training runs (ids by role)."""

    uri: str
    full: str  # learner, safetensors, patch_config.pkl/.json, params; named "fastmonai-train"
    json_only: str  # learner, configs/patch_config.json, params
    weights: str  # learner, safetensors, params
    bare: str  # learner only


def _log_run(client, experiment_id, name, artifacts, params=None, start=None, finish=True):
    run_id = client.create_run(experiment_id, start_time=start, run_name=name).info.run_id
    for source, folder in artifacts:
        client.log_artifact(run_id, str(source), folder)
    for key, value in (params or {}).items():
        client.log_param(run_id, key, value)
    if finish:
        client.set_terminated(run_id)
    return run_id


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", params=["file", "sqlite"])
def store(request, tmp_path_factory, migrated_sqlite: Path) -> Store:
    """One store per backend, shared by this module's tests (SQLite setup costs seconds)."""
    root = tmp_path_factory.mktemp(f"store-{request.param}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        if request.param == "file":
            uri = (root / "mlruns").as_uri()
        else:
            uri = sqlite_store(migrated_sqlite, root / "db")
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp = client.create_experiment("heart", artifact_location=(root / "artifacts").as_uri())
        model = [(LEARNER, "model"), (SAFETENSORS, "model")]
        configs = [(RUN / "patch_config.pkl", None), (RUN / "patch_config.json", None)]
        _log_run(client, exp, "fastmonai-train", [(LEARNER, "model")], start=1_000)
        full = _log_run(client, exp, "fastmonai-train", model + configs, PARAMS, start=2_000)
        _log_run(client, exp, "fastmonai-train", [], start=3_000, finish=False)  # RUNNING
        json_only = _log_run(
            client,
            exp,
            "json",
            [(LEARNER, "model"), (RUN / "patch_config.json", "configs")],
            PARAMS,
        )
        weights = _log_run(client, exp, "weights", model, PARAMS)
        bare = _log_run(client, exp, "bare", [(LEARNER, "model")])
        client.create_registered_model("heart")
        client.create_model_version("heart", f"runs:/{full}/model/best_learner.pkl", full)
        client.set_registered_model_alias("heart", "champion", "1")
        artifact_root = client.get_run(full).info.artifact_uri
        client.create_model_version("heart", f"{artifact_root}/model/best_model.safetensors", full)
        yield Store(uri, full, json_only, weights, bare)


def test_resolve_by_run_id_downloads_once_and_reads_the_pickled_config(store, tmp_path: Path):
    first = resolve({"run_id": store.full}, store.uri, tmp_path)
    again = resolve({"run_id": store.full}, store.uri, tmp_path)
    assert (first.downloaded, again.downloaded) == (True, False)
    assert first.local_path == again.local_path and first.local_path.name == "best_learner.pkl"
    assert first.sha256 == again.sha256 == _file_sha256(LEARNER)
    assert first.artifact_uri == f"runs:/{store.full}/model/best_learner.pkl"
    assert (first.training_run_name, first.training_experiment) == ("fastmonai-train", "heart")
    assert first.training_config.source == "patch_config.pkl"
    assert first.training_config.values["patch_size"] == [48, 48, 32]  # not the params' 64s
    assert first.training_config.unknown["sampler_type"] == "label"
    assert load_model_file(first.local_path).loader == "fastai_learner"


def test_resolve_by_experiment_and_run_name_takes_the_latest_finished_run(store, tmp_path):
    cfg = {"experiment": "heart", "run_name": "fastmonai-train"}
    resolved = resolve(cfg, store.uri, tmp_path)
    assert resolved.training_run_id == store.full
    assert any("2 FINISHED runs" in note for note in resolved.notes)
    with pytest.raises(SourceError, match="no FINISHED run named 'nope' .*no runs"):
        resolve({"experiment": "heart", "run_name": "nope"}, store.uri, tmp_path)
    with pytest.raises(
        SourceError, match=f"experiment 'lung' not found at tracking URI {store.uri}"
    ):
        resolve({"experiment": "lung", "run_name": "x"}, store.uri, tmp_path)


@pytest.mark.parametrize(
    ("uri", "artifact"),
    [
        ("runs:/{run}/model/best_learner.pkl", "model/best_learner.pkl"),
        ("models:/heart/1", "model/best_learner.pkl"),
        ("models:/heart@champion", "model/best_learner.pkl"),
        ("models:/heart/2", "model/best_model.safetensors"),  # source: absolute artifact URI
    ],
)
def test_resolve_by_uri(store, tmp_path: Path, uri: str, artifact: str):
    cfg = {"uri": uri.format(run=store.full), "tracking_uri": store.uri}  # overrides the next
    resolved = resolve(cfg, "file:///nonexistent/evaluation-store", tmp_path)
    assert resolved.training_run_id == store.full
    assert resolved.artifact_uri == f"runs:/{store.full}/{artifact}"
    assert resolved.local_path.name == Path(artifact).name


def test_training_config_sources_in_order(store, tmp_path: Path):
    def source(cfg):
        return resolve(cfg, store.uri, tmp_path).training_config

    assert source({"run_id": store.json_only}).source == "patch_config.json"  # in a subfolder
    explicit = source({"run_id": store.full, "config_artifact": "patch_config.json"})
    assert explicit.source == "patch_config.json"
    safe = source({"run_id": store.weights, "artifact": "model/best_model.safetensors"})
    assert safe.source == "safetensors" and safe.output["decision"] == "argmax"
    from_params = source({"run_id": store.weights})
    assert from_params.source == "mlflow_params"
    assert from_params.values == {"patch_size": [64, 64, 64], "target_spacing": [1.0, 1.0, 1.0]}
    assert source({"run_id": store.bare}).source == "none"


def test_resolve_errors_are_one_line_and_name_what_is_wrong(store, tmp_path: Path):
    cases = [
        ({"run_id": "0" * 32}, f"training run '{'0' * 32}' not found at tracking URI {store.uri}"),
        ({"run_id": store.full, "artifact": "model/last.pkl"}, "has no artifact file"),
        ({"run_id": store.full, "artifact": "../other/model.pkl"}, "escapes the run"),
        ({"run_id": store.full, "artifact": "/etc/passwd"}, "relative to the run"),
        ({"run_id": store.full, "config_artifact": "nope.json"}, "has no artifact file"),
        ({}, "set one of path, run_id"),
        ({"uri": "models:/heart/9"}, "models:/heart/9' not found"),
    ]
    for cfg, message in cases:
        with pytest.raises(SourceError, match=message) as err:
            resolve(cfg, store.uri, tmp_path)
        assert "\n" not in str(err.value)
    with pytest.raises(SourceError) as err:
        resolve({"run_id": store.full, "artifact": "model/last.pkl"}, store.uri, tmp_path)
    for existing in ("model/best_learner.pkl", "model/best_model.safetensors", "patch_config.pkl"):
        assert existing in str(err.value)


def test_resolve_by_local_path(store, tmp_path: Path):
    alone = resolve({"path": str(LEARNER)}, store.uri, tmp_path)
    assert (alone.local_path, alone.downloaded, alone.artifact_uri) == (LEARNER, False, None)
    assert alone.sha256 == _file_sha256(LEARNER) and alone.training_run_id is None
    # the training configuration beside the model file (the run's root, above model/)
    assert alone.training_config.source == "patch_config.pkl"
    assert alone.training_config.values["patch_size"] == [48, 48, 32]
    assert alone.training_config.values["aggregation_mode"] == "hann"
    safe = resolve({"path": str(SAFETENSORS)}, store.uri, tmp_path)
    assert safe.training_config.source == "patch_config.pkl"
    assert safe.training_config.output["decision"] == "argmax"  # the metadata's contract kept
    copy = tmp_path / "copy" / "best_model.safetensors"
    copy.parent.mkdir()
    copy.write_bytes(SAFETENSORS.read_bytes())
    assert resolve({"path": str(copy)}, store.uri, tmp_path).training_config.source == "safetensors"
    (copy.parent / "patch_config.json").write_bytes((RUN / "patch_config.json").read_bytes())
    beside = resolve({"path": str(copy)}, store.uri, tmp_path).training_config
    assert beside.source == "patch_config.json"
    chosen = {"path": str(copy), "config_artifact": str(RUN / "patch_config.pkl")}
    assert resolve(chosen, store.uri, tmp_path).training_config.source == "patch_config.pkl"
    with pytest.raises(SourceError, match=r"model.config_artifact=nope.json: no \.pkl or \.json"):
        resolve({"path": str(copy), "config_artifact": "nope.json"}, store.uri, tmp_path)
    with_run = resolve({"path": str(LEARNER), "run_id": store.full}, store.uri, tmp_path)
    assert with_run.local_path == LEARNER and with_run.training_config.source == "patch_config.pkl"
    with pytest.raises(SourceError, match="model.path: file not found"):
        resolve({"path": str(tmp_path / "missing.pkl")}, store.uri, tmp_path)


def test_artifact_paths_are_normalised():
    assert normalise_artifact_path("model//./best_learner.pkl") == "model/best_learner.pkl"
    for bad in ("..", "a/../../b", "C:/x", "s3://bucket/x", ""):
        with pytest.raises(SourceError):
            normalise_artifact_path(bad)


def _resolve_in_child(uri, run_id, cache, barrier, queue) -> None:
    barrier.wait(timeout=30)
    resolved = resolve({"run_id": run_id}, uri, cache)
    queue.put((resolved.downloaded, resolved.sha256))


def test_cache_is_filled_once_by_two_processes_at_once(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri)
    run_id = _log_run(client, client.create_experiment("x"), "r", [(LEARNER, "model")])
    context = multiprocessing.get_context("fork")  # children share the imports: no start cost
    barrier, queue = context.Barrier(2), context.Queue()
    args = (uri, run_id, tmp_path / "cache", barrier, queue)
    children = [context.Process(target=_resolve_in_child, args=args) for _ in range(2)]
    for child in children:
        child.start()
    results = sorted(queue.get(timeout=60) for _ in children)
    for child in children:
        child.join(timeout=30)
    assert [downloaded for downloaded, _ in results] == [False, True]
    assert {sha for _, sha in results} == {_file_sha256(LEARNER)}
    assert len(list((tmp_path / "cache" / run_id).glob("*/best_learner.pkl"))) == 1


def test_unreachable_tracking_server_fails_fast_naming_the_uri(tmp_path: Path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    exported = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    with pytest.raises(SourceError, match=f"cannot read run 'abc' from {uri}"):
        resolve({"run_id": "abc"}, uri, tmp_path)
    # the one HTTP policy: bounded retries unless the user exported their own
    expected = exported or HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == expected

"""Finding the model among a training run's artifacts: the order, roles, siblings, errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from callback_run import ARTIFACTS, log_callback_run, recorded_artifacts
from mlflow import MlflowClient

from evalharness.config.schema import ModelConfig, from_mapping
from evalharness.data.training_split import training_split_of
from evalharness.errors import SourceError
from evalharness.model.discovery import choose_model_artifact, safetensors_sibling
from evalharness.model.loaders import load_model_file, load_resolved_model
from evalharness.model.sources import resolve_model

CALLBACK = recorded_artifacts()  # what fastMONAI 0.12's callback logged
LOAD_OPTIONS = ModelConfig()  # arch None, no extra globals, no trust


def resolve(cfg: dict, uri: str, cache: Path):
    return resolve_model(from_mapping(ModelConfig, cfg), uri, cache)


def test_the_callback_layout_gives_the_best_safetensors_and_final_on_request():
    assert CALLBACK == [
        "data/train_val_split.csv",
        "model/best_model.safetensors",
        "model/best_weights.pth",
        "model/final_model.safetensors",
        "model/final_weights.pth",
    ]
    best = choose_model_artifact(CALLBACK)
    assert (best.artifact, best.sibling) == ("model/best_model.safetensors", None)
    final = choose_model_artifact(CALLBACK, "final")
    assert (final.artifact, final.sibling) == ("model/final_model.safetensors", None)


def test_order_learner_then_safetensors_then_final_then_other_files():
    learner = ["model/best_learner.pkl", *CALLBACK]
    assert choose_model_artifact(learner).artifact == "model/best_learner.pkl"
    only_final = ["model/final_model.safetensors", "model/best_weights.pth"]
    chosen = choose_model_artifact(only_final)
    assert chosen.artifact == "model/final_model.safetensors"
    assert "no best-role model" in chosen.reason
    weights = ["model/MLmodel", "model/zz.pt", "model/best_weights.pth", "model/notes.txt"]
    assert choose_model_artifact(weights).artifact == "model/best_weights.pth"  # role first
    assert choose_model_artifact(["model/a.pt", "model/final_weights.pth"]).artifact == "model/a.pt"
    assert choose_model_artifact(["model/MLmodel", "weights.pth", "model/x.txt"]) is None
    assert choose_model_artifact(["model/best_weights.pth"], "final") is None


def test_a_state_dict_takes_the_architecture_of_a_safetensors_sibling_of_its_role_first():
    paths = ["model/x.safetensors", "model/final_weights.pth", "model/best_model.safetensors"]
    final = choose_model_artifact(paths, "final")  # no final-role sibling: the first by name
    assert (final.artifact, final.sibling) == (
        "model/final_weights.pth",
        "model/best_model.safetensors",
    )
    assert safetensors_sibling(CALLBACK, "model/final_weights.pth") == (
        "model/final_model.safetensors"
    )
    assert safetensors_sibling(CALLBACK, "model/best_model.safetensors") is None
    assert safetensors_sibling(["model/w.pth"], "model/w.pth") is None
    assert safetensors_sibling(CALLBACK, "model/a.pt") is None  # TorchScript or pickled module


@dataclass(frozen=True)
class Runs:
    uri: str
    full: str  # as the callback logged it
    weights: str  # the two state dicts and the split, no safetensors
    nothing: str  # no model file at all, no split


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("discovery")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (root / "mlruns").as_uri()
        full = log_callback_run(uri)
        weights = log_callback_run(
            uri, artifacts=[p for p in CALLBACK if not p.endswith(".safetensors")]
        )
        nothing = log_callback_run(uri, artifacts=[])
        client = MlflowClient(tracking_uri=uri)
        client.log_text(nothing, "notes", "model/README.txt")
        yield Runs(uri, full, weights, nothing)


def test_resolve_discovers_the_model_and_an_explicit_artifact_wins(runs, tmp_path):
    found = resolve({"run_id": runs.full}, runs.uri, tmp_path)
    assert found.artifact == "model/best_model.safetensors"
    assert found.artifact_reason == "first of the discovery order for model.role=best"
    assert found.training_config.source == "safetensors"
    assert found.split_version and found.training_split_path.name == "train_val_split.csv"
    final = resolve({"run_id": runs.full, "role": "final"}, runs.uri, tmp_path)
    assert final.artifact == "model/final_model.safetensors"
    assert final.sha256 != found.sha256
    cfg = {"run_id": runs.full, "artifact": "model/best_weights.pth"}
    explicit = resolve(cfg, runs.uri, tmp_path)
    assert (explicit.artifact, explicit.artifact_reason) == (cfg["artifact"], "model.artifact")
    assert explicit.sibling_metadata_path.name == "best_model.safetensors"
    assert explicit.training_config.source == "safetensors"  # the sibling's inference_config


def test_state_dict_with_sibling_metadata_loads_the_same_network_as_the_safetensors(runs, tmp_path):
    cfg = {"run_id": runs.full, "artifact": "model/best_weights.pth"}
    resolved = resolve(cfg, runs.uri, tmp_path)
    loaded = load_resolved_model(resolved, LOAD_OPTIONS)
    reference = load_model_file(ARTIFACTS / "model" / "best_model.safetensors").network
    assert loaded.loader == "state_dict"
    x = torch.randn(1, 1, 48, 48, 32)
    with torch.no_grad():
        assert torch.equal(loaded.network(x), reference(x))


def test_a_bare_state_dict_without_any_architecture_asks_for_model_arch(runs, tmp_path):
    resolved = resolve({"run_id": runs.weights}, runs.uri, tmp_path)
    assert resolved.artifact == "model/best_weights.pth" and resolved.sibling_metadata_path is None
    assert resolved.training_config.source == "mlflow_params"  # the callback's patch_* params
    with pytest.raises(SourceError, match="is a state dict: model.arch is required"):
        load_resolved_model(resolved, LOAD_OPTIONS)


def test_nothing_loadable_lists_what_the_run_holds(runs, tmp_path):
    with pytest.raises(SourceError) as error:
        resolve({"run_id": runs.nothing}, runs.uri, tmp_path)
    message = str(error.value)
    assert f"run '{runs.nothing}' has no loadable model file" in message
    assert "model/best_learner.pkl, model/best_model.safetensors" in message
    assert "it has: model/README.txt" in message and "\n" not in message


def _split_of(resolved, method: str):
    return training_split_of(
        resolved.training_split_path, resolved.training_run_id, resolved.split_version, method
    )


def test_held_out_without_the_split_file_names_the_missing_artifact(runs, tmp_path):
    cfg = {"run_id": runs.full, "artifact": "model/best_model.safetensors"}
    resolved = resolve(cfg, runs.uri, tmp_path)
    assert _split_of(resolved, "held_out").version == resolved.split_version
    bare = resolve(
        {"path": str(ARTIFACTS / "model" / "best_model.safetensors")}, runs.uri, tmp_path
    )
    assert _split_of(bare, "held_out") is None  # no run: load_dataset says so
    lone = log_callback_run(runs.uri, artifacts=["model/best_model.safetensors"])
    no_split = resolve({"run_id": lone}, runs.uri, tmp_path)
    assert _split_of(no_split, "all") is None
    with pytest.raises(SourceError, match=f"training run '{lone}' has no artifact 'data/train_val"):
        _split_of(no_split, "held_out")


def test_model_path_is_tagged_as_such(runs, tmp_path):
    local = Path(ARTIFACTS / "model" / "best_model.safetensors")
    resolved = resolve({"path": str(local)}, runs.uri, tmp_path)
    assert (resolved.artifact, resolved.artifact_reason) == (None, "model.path")

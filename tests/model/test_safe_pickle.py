"""The restricted unpickler: real fastai export loads without fastai; payloads never run."""

from __future__ import annotations

import os
import pickle
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE

from evalharness.errors import SourceError
from evalharness.model.safe_pickle import is_placeholder, load_data_pickle, load_model_pickle

RUN = FIXTURE / "training_run"


class Payload:
    """Pickles as a call of ``function(*args)``: what a malicious file does."""

    def __init__(self, function, args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


class Tiny(torch.nn.Module):
    """A custom architecture, not on the allow-list by default."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)


def _write(path: Path, obj, how: str) -> Path:
    if how == "torch":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    return path


def test_fastai_learner_export_loads_without_fastai_as_placeholder_with_real_model():
    learner = load_model_pickle(RUN / "model" / "best_learner.pkl")
    assert is_placeholder(learner)
    assert "fastai.learner.Learner" in repr(learner)
    assert type(learner.model).__name__ == "UNet"
    assert type(learner.model).__module__ == "monai.networks.nets.unet"
    # training-only state stays inert: the MONAI loss and fastai callbacks are placeholders
    assert is_placeholder(learner.loss_func) and is_placeholder(learner.recorder)
    weights = torch.load(RUN / "model" / "best_weights_state_dict.pth", weights_only=True)
    state = learner.model.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], weights[k]) for k in weights)


@pytest.mark.parametrize("how", ["pickle", "torch"])
def test_os_system_payload_is_refused_and_never_runs(tmp_path: Path, how: str):
    marker = tmp_path / "pwned"
    path = _write(tmp_path / "evil.pkl", {"x": Payload(os.system, (f"touch {marker}",))}, how)
    with pytest.raises(
        SourceError, match=r"refused to unpickle global '(os|posix)\.system'"
    ) as err:
        load_model_pickle(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("how", ["pickle", "torch"])
@pytest.mark.parametrize(
    ("function", "args", "name"),
    [
        (eval, ("1 + 1",), "builtins.eval"),
        (subprocess.Popen, (["true"],), "subprocess.Popen"),
        (torch.hub.load, ("owner/repo", "model"), "torch.hub.load"),
        (getattr, (Path, "home"), "builtins.getattr"),
        (type, ("X", (object,), {}), "builtins.type"),
    ],
)
def test_dangerous_globals_are_refused(tmp_path: Path, how, function, args, name):
    path = _write(tmp_path / "evil.pkl", [Payload(function, args)], how)
    with pytest.raises(SourceError, match=f"refused to unpickle global '{name}'"):
        load_model_pickle(path)


def test_allow_globals_extends_the_list_but_never_the_deny_list(tmp_path: Path):
    path = _write(tmp_path / "tiny.pt", Tiny(), "torch")
    qualified = f"{Tiny.__module__}.{Tiny.__qualname__}"
    with pytest.raises(SourceError, match=f"'{qualified}' .*model.allow_globals"):
        load_model_pickle(path)
    assert isinstance(load_model_pickle(path, allow_globals=[qualified]), Tiny)
    assert isinstance(load_model_pickle(path, trust_pickle=True), Tiny)
    evil = _write(tmp_path / "evil.pkl", Payload(eval, ("1",)), "pickle")
    with pytest.raises(SourceError, match="never allowed"):
        load_model_pickle(evil, allow_globals=["builtins.eval"])
    with pytest.raises(SourceError, match="fully qualified"):
        load_model_pickle(path, allow_globals=["Tiny"])


def test_tensors_in_plain_and_legacy_pickles_load_through_the_restricted_path(tmp_path: Path):
    state = {"w": torch.arange(4.0), "p": torch.nn.Parameter(torch.ones(2)), "d": torch.float16}
    plain = _write(tmp_path / "plain.pkl", state, "pickle")  # tensors via _load_from_bytes
    legacy = tmp_path / "legacy.pt"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    for path in (plain, legacy):
        loaded = load_model_pickle(path)
        assert torch.equal(loaded["w"], state["w"]) and loaded["d"] is torch.float16


def test_payload_hidden_in_tensor_bytes_of_a_plain_pickle_is_refused(tmp_path: Path):
    marker = tmp_path / "pwned"
    inner = pickle.dumps(Payload(os.system, (f"touch {marker}",)))
    evil = Payload(torch.storage._load_from_bytes, (inner,))
    path = _write(tmp_path / "evil.pkl", evil, "pickle")
    with pytest.raises(SourceError, match="system"):
        load_model_pickle(path)
    assert not marker.exists()


def test_cloudpickled_function_becomes_inert(tmp_path: Path):
    cloudpickle = pytest.importorskip("cloudpickle")
    marker = tmp_path / "pwned"

    def touch():
        import os as inner_os

        return inner_os.system(f"touch {marker}")

    path = tmp_path / "fn.pkl"
    path.write_bytes(cloudpickle.dumps({"loss": touch}))
    loaded = load_model_pickle(path)
    assert is_placeholder(loaded["loss"])
    assert is_placeholder(loaded["loss"]())  # calling it records, never executes
    assert not marker.exists()


def test_data_pickle_allows_plain_values_only(tmp_path: Path):
    config = load_data_pickle(RUN / "patch_config.pkl")
    assert config["patch_size"] == [48, 48, 32] and config["aggregation_mode"] == "hann"
    path = _write(tmp_path / "t.pkl", {"w": torch.zeros(1)}, "pickle")
    with pytest.raises(SourceError, match="plain data only"):
        load_data_pickle(path)

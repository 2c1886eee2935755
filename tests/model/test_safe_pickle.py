"""The restricted unpickler: real fastai export loads without fastai; payloads never run."""

from __future__ import annotations

import http.server
import os
import pickle
import subprocess
import threading
from pathlib import Path
from typing import ClassVar

import monai.networks.nets
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


# ------------------------------------------- allowed classes are rebuilt, never constructed


class WritesOnInit(torch.nn.Module):
    """An architecture (allowed through model.allow_globals) whose constructor writes a file."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        Path(marker).write_text("constructed")
        self.marker = marker
        self.conv = torch.nn.Conv3d(1, 1, 1)


class WritesOnNew:
    """A class whose ``__new__`` writes the file named by its (pickled) argument."""

    def __new__(cls, marker: str):
        Path(marker).write_text("new")
        return super().__new__(cls)

    def __getnewargs__(self):
        return (self.marker,)


SIDE_EFFECTS = [f"{c.__module__}.{c.__qualname__}" for c in (WritesOnInit, WritesOnNew)]


class _Counting(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        type(self).requests.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"payload written by a constructor")

    def log_message(self, *args) -> None:
        """Quiet."""


@pytest.fixture
def loopback(monkeypatch, tmp_path: Path):
    """(URL of a local HTTP server that counts its requests, that count's list, TORCH_HOME)."""
    _Counting.requests = []
    server = http.server.HTTPServer(("127.0.0.1", 0), _Counting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    yield f"http://127.0.0.1:{server.server_port}/payload", _Counting.requests, home
    server.shutdown()
    server.server_close()


def _hovernet(url: str) -> Payload:
    """What the hostile learner held: HoVerNet's constructor called with a pretrained URL."""
    args = ("fast", 1, 2, 0, ("relu", {"inplace": True}), "batch", False, 0.0, url)
    return Payload(monai.networks.nets.HoVerNet, args)


def _opcodes(*parts: bytes) -> bytes:
    """A protocol-0 pickle from raw opcodes (what no pickler would write for us)."""
    return b"".join(parts) + b"."


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _call(callable_: bytes, *args: str) -> bytes:
    return callable_ + b"(" + b"".join(b"V" + a.encode() + b"\n" for a in args) + b"tR"


@pytest.mark.parametrize("how", ["pickle", "torch"])
def test_an_allowed_class_is_never_called_with_the_files_arguments(loopback, tmp_path, how):
    url, requests, home = loopback
    path = _write(tmp_path / "best_learner.pkl", {"model": _hovernet(url)}, how)
    with pytest.raises(SourceError) as refused:
        load_model_pickle(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: refused to call 'monai.networks.nets.hovernet.HoVerNet'")
    assert "never constructed while loading" in message and "\n" not in message
    assert requests == [] and not home.exists()  # no request made, nothing written


def test_the_same_file_trusted_does_reach_the_network(loopback, tmp_path):
    """What the refusal prevents: unpickled without limits, the constructor fetches the URL."""
    url, requests, home = loopback
    path = _write(tmp_path / "best_learner.pkl", _hovernet(url), "pickle")
    with pytest.raises(Exception):  # noqa: B017 - the payload is no checkpoint; the fetch happened
        load_model_pickle(path, trust_pickle=True)
    assert requests == ["/payload"] and any(home.rglob("*.pth"))


def test_a_pickled_module_is_rebuilt_from_its_state_without_its_constructor(tmp_path):
    marker = tmp_path / "constructed"
    module = WritesOnInit(str(marker))
    marker.unlink()
    path = _write(tmp_path / "net.pt", module, "torch")
    loaded = load_model_pickle(path, allow_globals=SIDE_EFFECTS)
    assert isinstance(loaded, WritesOnInit) and loaded.marker == str(marker)
    assert torch.equal(loaded.conv.weight, module.conv.weight)
    assert not marker.exists()


@pytest.mark.parametrize(
    "stream",
    [
        "reduce",  # the class called: WritesOnInit(marker)
        "reconstructor",  # copyreg._reconstructor(cls, cls, marker) calls base.__init__
        "newobj_args",  # NEWOBJ with arguments: a class's own __new__ would run
        "newobj_helper",  # copyreg.__newobj__(cls, marker)
        "from_type",  # torch._tensor._rebuild_from_type_v2(cls, Tensor, (marker,), {})
        "partial",  # functools.partial(cls, marker), then called
    ],
)
def test_no_path_calls_an_allowed_constructor(tmp_path, stream):
    marker = tmp_path / "side_effect"
    on_init, on_new = (f"{c.__module__}.{c.__qualname__}" for c in (WritesOnInit, WritesOnNew))
    mod, init_name = on_init.rsplit(".", 1)
    new_mod, new_name = on_new.rsplit(".", 1)
    streams = {
        "reduce": _call(_global(mod, init_name), str(marker)),
        "reconstructor": _global("copyreg", "_reconstructor")
        + b"("
        + _global(mod, init_name)
        + _global(mod, init_name)
        + b"V"
        + str(marker).encode()
        + b"\ntR",
        "newobj_args": b"\x80\x02"
        + _global(new_mod, new_name)
        + b"V"
        + str(marker).encode()
        + b"\n\x85\x81",
        "newobj_helper": _global("copyreg", "__newobj__")
        + b"("
        + _global(new_mod, new_name)
        + b"V"
        + str(marker).encode()
        + b"\ntR",
        "from_type": _global("torch._tensor", "_rebuild_from_type_v2")
        + b"("
        + _global(mod, init_name)
        + _global("torch", "Tensor")
        + b"(V"
        + str(marker).encode()
        + b"\nt(dtR",
        "partial": _call(_global("functools", "partial") + b"(" + _global(mod, init_name) + b"tR"),
    }
    path = tmp_path / "evil.pkl"
    path.write_bytes(_opcodes(streams[stream]))
    allow = [*SIDE_EFFECTS, "functools.partial"]
    with pytest.raises(SourceError, match="refused to call '.*'") as refused:
        load_model_pickle(path, allow_globals=allow)
    assert "\n" not in str(refused.value)
    assert not marker.exists()


def test_getattr_chains_and_patching_globals_are_refused(tmp_path):
    chain = tmp_path / "chain.pkl"
    chain.write_bytes(_opcodes(_call(_global("pathlib", "Path.write_text"), "x")))
    with pytest.raises(SourceError, match="refused to unpickle global 'pathlib.Path.write_text'"):
        load_model_pickle(chain)
    dunder = tmp_path / "dunder.pkl"
    dunder.write_bytes(_opcodes(_call(_global("torch.nn", "Conv3d.__init__"), "x")))
    with pytest.raises(SourceError, match="refused to unpickle global 'torch.nn.Conv3d.__init__'"):
        load_model_pickle(dunder)
    # BUILD on a class would set an attribute on it for the whole process
    patch = tmp_path / "patch.pkl"
    patch.write_bytes(_opcodes(_global("torch.nn", "Conv3d") + b"(dVforward\nI1\nsb"))
    with pytest.raises(SourceError, match="refused to call 'torch.nn.modules.conv.Conv3d'"):
        load_model_pickle(patch)
    assert callable(torch.nn.Conv3d.forward)


def test_corrupt_data_pickles_name_the_file(tmp_path):
    source = (RUN / "patch_config.pkl").read_bytes()
    corrupt = {
        "truncated": source[: len(source) // 2],
        "garbage": b"\x00\xffnot a pickle at all",
        "odict": _opcodes(_global("collections", "OrderedDict") + b"(I1\ntR"),
    }
    for name, data in corrupt.items():
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(data)
        with pytest.raises(SourceError, match=rf"^{path}: not a readable pickle \(\w+: ") as err:
            load_data_pickle(path)
        assert "\n" not in str(err.value)

"""Faults lose nothing: a failing case is isolated (or stops the run), a killed evaluation
resumes without recomputing its finished cases, and a volume too large for the device's memory
budget is aggregated on the CPU (or fails alone) instead of killing the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, sqlite_store
from mlflow.tracking import MlflowClient
from tiny import (
    Result,
    ball,
    base_overrides,
    good_case,
    run_in_process,
    threshold_model,
    write_dataset,
)

from evalharness.errors import STOP_SIGNALS, CaseError, Stopped, sigterm_seen, stop_on_sigterm
from evalharness.predict.memory import MB, aggregation_bytes, plan_buffers, plan_for
from evalharness.track.tracking import prepare_store

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, migrated_sqlite: Path) -> tuple[str, Path]:
    """(tracking URI, model file) shared by the in-process tests; one experiment per test."""
    folder = tmp_path_factory.mktemp("store")
    torch.save(threshold_model(), folder / "model.pt")
    return sqlite_store(migrated_sqlite, folder / "mlflow.db"), folder / "model.pt"


def nan_case() -> tuple[np.ndarray, np.ndarray]:
    image, label = good_case()
    image[0, 0, 0] = np.nan
    return image, label


def evaluate(store, tmp_path: Path, capsys, root: Path, *overrides: str) -> Result:
    uri, model = store
    base = base_overrides(uri, model, root, tmp_path.name)
    return run_in_process(uri, tmp_path / "out", [*base, *overrides], capsys)


# ---------------------------------------------------------------------- per-case isolation


def test_continue_records_the_failing_case_and_goes_on(store, tmp_path: Path, capsys) -> None:
    cases = {"a": good_case(), "b": nan_case(), "c": good_case()}
    root = write_dataset(tmp_path / "data", cases)
    result = evaluate(store, tmp_path, capsys, root)  # run.on_case_error=continue: the default
    assert result.outcome.code == 2 and result.run.info.status == "FINISHED"
    assert list(result.table["case"]) == ["a", "b", "c"]
    assert list(result.table["status"]) == ["ok", "failed", "ok"]
    assert "NaN or infinite voxels" in result.row("b")["error"]
    assert result.run.data.metrics["n_failed_cases"] == 1
    good = write_dataset(tmp_path / "good", {"a": good_case(), "c": good_case()})
    assert evaluate(store, tmp_path, capsys, good, "mlflow.experiment=good").outcome.code == 0


def test_stop_ends_the_run_at_the_first_failure_and_a_rerun_resumes(
    store, tmp_path: Path, capsys
) -> None:
    root = write_dataset(tmp_path / "data", {"a": good_case(), "b": nan_case(), "c": good_case()})
    stopped = evaluate(store, tmp_path, capsys, root, "run.on_case_error=stop")
    assert stopped.outcome.code == 1 and stopped.run.info.status == "FAILED"
    assert len(stopped.error_lines) == 1 and "Traceback" not in stopped.stderr
    line = stopped.error_lines[0]
    assert line.startswith("error: case b: ") and "(run.on_case_error=stop)" in line
    assert stopped.run.data.tags["evalharness.error"] == line[len("error: ") :]
    assert list(stopped.table["case"]) == ["a", "b"]  # c never started
    assert list(stopped.table["status"]) == ["ok", "failed"]

    write_dataset(tmp_path / "data", {"a": good_case(), "b": good_case(), "c": good_case()})
    resumed = evaluate(store, tmp_path, capsys, root, "run.on_case_error=stop")
    assert resumed.outcome.code == 0 and resumed.run.info.status == "FINISHED"
    assert resumed.run.data.tags["evalharness.resumed_from"] == stopped.run.info.run_id
    assert sorted(resumed.table["case"]) == ["a", "b", "c"]
    assert (resumed.table["status"] == "ok").all()
    assert resumed.row("a")["seconds"] == stopped.row("a")["seconds"]  # kept, not recomputed


# ---------------------------------------------------------------------------- kill and resume

SLOW_MODEL = '''
"""The threshold model, slow on purpose (one second a forward pass), counting its calls."""
import time
from pathlib import Path

import torch

CALLS = Path({calls!r})


class SlowNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 1)

    def forward(self, x):
        with CALLS.open("a") as log:
            log.write("forward\\n")
        time.sleep(1.0)
        return self.conv(x)
'''


def _slow_model(folder: Path, monkeypatch) -> Path:
    (folder / "slownet.py").write_text(
        textwrap.dedent(SLOW_MODEL.format(calls=str(folder / "calls")))
    )
    monkeypatch.syspath_prepend(str(folder))
    from slownet import SlowNet

    model = SlowNet()
    model.conv.load_state_dict(threshold_model().state_dict())
    torch.save(model, folder / "slow.pt")
    return folder / "slow.pt"


def _start(folder: Path, overrides: list[str], run_dir: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(folder)])}
    command = [sys.executable, "-m", "evalharness", *overrides, f"hydra.run.dir={folder / run_dir}"]
    return subprocess.Popen(
        command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _finished_cases(client: MlflowClient, experiment: str, scratch: Path) -> pd.DataFrame | None:
    """per_case.csv of the experiment's only run as MLflow holds it now (None before it exists)."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id]) if found else []
    if not runs or "per_case.csv" not in {
        a.path for a in client.list_artifacts(runs[0].info.run_id)
    }:
        return None
    return pd.read_csv(client.download_artifacts(runs[0].info.run_id, "per_case.csv", str(scratch)))


def test_a_killed_evaluation_resumes_without_recomputing_finished_cases(
    tmp_path: Path, monkeypatch, migrated_sqlite: Path
) -> None:
    uri = sqlite_store(migrated_sqlite, tmp_path / "mlflow.db")
    model = _slow_model(tmp_path, monkeypatch)
    root = write_dataset(tmp_path / "data", {f"case{i}": good_case() for i in range(4)})
    overrides = [
        *base_overrides(uri, model, root, "kill"),
        "model.allow_globals=[slownet.SlowNet]",
        "inference.batch_size=8",  # one forward pass per case
    ]
    client = prepare_store(uri)  # created here, under the harness's lock, before the runs
    process = _start(tmp_path, overrides, "first")
    deadline = time.monotonic() + 240
    while (done := _finished_cases(client, "kill", tmp_path / "poll")) is None or done.empty:
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)  # in the middle of the next case (a second long)
    process.communicate()
    killed_id = client.search_runs([client.get_experiment_by_name("kill").experiment_id])[0]
    killed_id = killed_id.info.run_id
    kept = _finished_cases(client, "kill", tmp_path / "kept")
    assert 1 <= len(kept) < 4

    (tmp_path / "calls").unlink()
    second = _start(tmp_path, overrides, "second")
    output = second.communicate(timeout=240)[0]
    assert second.returncode == 0, output[-3000:]
    assert f"resuming run {killed_id}: {len(kept)} case(s) already done" in output
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 1 + 4 - len(kept)  # the channel probe, then only the missing cases

    killed = client.get_run(killed_id)
    assert killed.info.status == "KILLED"
    assert killed.data.tags["evalharness.error"] == "process ended without finishing"
    runs = client.search_runs([killed.info.experiment_id], order_by=["attributes.start_time DESC"])
    final = runs[0]
    assert final.info.status == "FINISHED" and len(runs) == 2
    assert final.data.tags["evalharness.resumed_from"] == killed_id
    table = pd.read_csv(client.download_artifacts(final.info.run_id, "per_case.csv", str(tmp_path)))
    assert sorted(table["case"]) == [f"case{i}" for i in range(4)]  # every case exactly once
    assert (table["status"] == "ok").all() and (table["dsc"] == 1.0).all()
    merged = kept.merge(table, on="case", suffixes=("_killed", "_final"))
    assert (merged["seconds_killed"] == merged["seconds_final"]).all()  # rows carried over


# ----------------------------------------------------------------------------------- memory


def test_aggregation_buffers_are_counted_in_float32_planes() -> None:
    assert aggregation_bytes((10, 10, 10), 1, 3, "hann") == 4 * (1 + 3 + 1) * 1000
    assert aggregation_bytes((10, 10, 10), 1, 3, "crop") == 4 * (1 + 3) * 1000  # no weights


def test_buffer_plan_falls_back_from_the_gpu_to_the_cpu() -> None:
    fits = plan_buffers(CUDA, 10 * MB, device_free_bytes=80 * MB, cpu_free_bytes=900 * MB)
    assert fits.device == CUDA and fits.warning is None
    capped = plan_buffers(CUDA, 10 * MB, 80 * MB, 900 * MB, limit_mb=5)
    assert capped.device == CPU
    assert "inference.max_device_memory_mb=5" in capped.warning
    assert "aggregating this volume on the CPU" in capped.warning
    full = plan_buffers(CUDA, 10 * MB, device_free_bytes=2 * MB, cpu_free_bytes=900 * MB)
    assert full.device == CPU and "2.0 MB available on cuda" in full.warning
    with pytest.raises(CaseError, match=r"need 10\.0 MB.*2\.0 MB available on cuda.*3\.0 MB on"):
        plan_buffers(CUDA, 10 * MB, device_free_bytes=2 * MB, cpu_free_bytes=3 * MB)
    with pytest.raises(CaseError, match=r"0\.5 MB available on cpu \(inference\.max_device"):
        plan_buffers(CPU, 10 * MB, 900 * MB, 900 * MB, limit_mb=0.5)
    assert plan_for(CPU, (10, 10, 10), 1, 2, "hann", None).device == CPU  # measured host memory


def test_a_volume_over_the_memory_budget_fails_alone(store, tmp_path: Path, capsys) -> None:
    big = ball((40, 40, 40), radius=10.0)
    root = write_dataset(
        tmp_path / "data", {"small": good_case(), "big": (big.astype(np.float32), big)}
    )
    result = evaluate(store, tmp_path, capsys, root, "inference.max_device_memory_mb=0.1")
    assert result.outcome.code == 2 and result.run.info.status == "FINISHED"
    assert result.row("small")["status"] == "ok"
    error = result.row("big")["error"]
    assert "the aggregation buffers need 0.7 MB, more than the 0.1 MB available on cpu" in error
    assert "(inference.max_device_memory_mb=0.1)" in error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_aggregation_falls_back_to_the_cpu_with_a_warning(
    store, tmp_path: Path, capsys, caplog
) -> None:
    root = write_dataset(tmp_path / "data", {"a": good_case()})
    on_gpu = evaluate(store, tmp_path, capsys, root, "inference.device=cuda")
    fallback = evaluate(
        store,
        tmp_path,
        capsys,
        root,
        "inference.device=cuda",
        "inference.max_device_memory_mb=0.001",
        "mlflow.experiment=fallback",
    )
    assert fallback.outcome.code == 0
    assert "aggregating this volume on the CPU" in caplog.text
    assert fallback.row("a")["dsc"] == on_gpu.row("a")["dsc"] == 1.0


def _stop_after_first_case(
    process: subprocess.Popen[str], client: MlflowClient, experiment: str, sig: int
) -> tuple[int, str]:
    """Send `sig` once the newest run of `experiment` logged a case; (exit code, output)."""
    deadline = time.monotonic() + 240
    while True:
        found = client.get_experiment_by_name(experiment)
        runs = (
            client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"])
            if found
            else []
        )
        running = runs and runs[0].info.status == "RUNNING"
        if running and "per_case.csv" in {
            a.path for a in client.list_artifacts(runs[0].info.run_id)
        }:
            break
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    process.send_signal(sig)
    output = process.communicate(timeout=120)[0]
    return process.returncode, output


def test_sigterm_and_ctrl_c_close_a_single_evaluation_as_killed(
    tmp_path: Path, monkeypatch, sqlite_uri: str
):
    """What SLURM sends on preemption, then Ctrl-C on the resumed run: each closes its run
    KILLED with the rows so far kept, prints one line (no traceback) and exits 128 + signal."""
    uri = sqlite_uri
    model = _slow_model(tmp_path, monkeypatch)
    root = write_dataset(tmp_path / "data", {f"case{i}": good_case() for i in range(4)})
    overrides = [
        *base_overrides(uri, model, root, "stop"),
        "model.allow_globals=[slownet.SlowNet]",
        "inference.batch_size=8",
    ]
    client = prepare_store(uri)
    outcomes = []
    for number, sig in enumerate((signal.SIGTERM, signal.SIGINT)):
        process = _start(tmp_path, overrides, f"run{number}")
        code, output = _stop_after_first_case(process, client, "stop", sig)
        outcomes.append((code, output))
    (term_code, term_out), (int_code, int_out) = outcomes
    assert term_code == 143, term_out[-3000:]
    assert int_code == 130, int_out[-3000:]
    for output, name in ((term_out, "SIGTERM"), (int_out, "Ctrl-C")):
        assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
        stopped = [line for line in output.splitlines() if line.startswith("stopped by")]
        assert stopped == [
            f"stopped by {name}: any run in progress was closed as KILLED; "
            "the same command resumes it"
        ]
    experiment = client.get_experiment_by_name("stop").experiment_id
    first, second = client.search_runs([experiment], order_by=["attributes.start_time ASC"])
    assert first.info.status == second.info.status == "KILLED"
    assert first.data.tags["evalharness.error"] == "interrupted"
    assert second.data.tags["evalharness.resumed_from"] == first.info.run_id
    kept = pd.read_csv(client.download_artifacts(first.info.run_id, "per_case.csv", str(tmp_path)))
    assert 1 <= len(kept) < 4 and (kept["status"] == "ok").all()


def test_sighup_and_sigterm_unwind_like_ctrl_c_once() -> None:
    """A closed terminal (SIGHUP) stops like SIGTERM; a second stop signal while the runs are
    being closed is ignored (the handler is this process's real one, signals really sent)."""
    saved = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        for sent in (signal.SIGHUP, signal.SIGTERM):
            for s in STOP_SIGNALS:
                signal.signal(s, signal.SIG_DFL)
            stop_on_sigterm()
            with pytest.raises(Stopped) as stopped:
                os.kill(os.getpid(), sent)
                time.sleep(5)  # the handler raises at the next bytecode
            assert (stopped.value.signum, stopped.value.name) == (sent, sent.name)
            assert sigterm_seen()
            os.kill(os.getpid(), signal.SIGTERM)  # ignored now: no second interruption
            assert all(signal.getsignal(s) == signal.SIG_IGN for s in STOP_SIGNALS)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)

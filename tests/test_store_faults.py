"""A full disk or a read-only folder under the store, its artifacts or the outputs: one
`error:` line naming the store or file and the cause, the run closed where the store still
takes writes, the per-case rows kept, and the same command resumes once there is room.

The file systems are real: a small tmpfs mounted for the test (root only: elsewhere these
tests are skipped, as a CUDA test is without a GPU). The disk fills mid-run from inside the
model's forward pass, so the failure lands between cases deterministically.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from tiny import base_overrides, good_case, run_in_process, threshold_model, write_dataset

from evalharness.track.tracking import prepare_store


class FillingNet(torch.nn.Module):
    """The threshold model; its `fill_at`-th forward pass fills the file system of `filler`,
    while the file ``<filler>.armed`` exists."""

    def __init__(self, filler: str, fill_at: int) -> None:
        super().__init__()
        self.conv = threshold_model()
        self.filler, self.fill_at, self.calls = filler, fill_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fill_at and Path(f"{self.filler}.armed").exists():
            fill(Path(self.filler))
        return self.conv(x)


FILLING = f"{FillingNet.__module__}.{FillingNet.__qualname__}"


def fill(path: Path) -> None:
    """Write `path` until its file system has no space left."""
    block = b"\0" * 65536
    with contextlib.suppress(OSError), path.open("ab") as out:
        while True:
            out.write(block)
            out.flush()


@contextlib.contextmanager
def tmpfs(folder: Path, size_kb: int, read_only: bool = False) -> Iterator[Path]:
    """A real size-limited (or read-only) file system mounted at `folder` for the test."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _model(folder: Path, filler: Path, fill_at: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Path(f"{filler}.armed").touch()
    torch.save(FillingNet(str(filler), fill_at), folder / "filling.pt")
    return folder / "filling.pt"


def _cases(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data", {f"case{i}": good_case() for i in range(3)})


def test_a_full_disk_under_the_store_ends_on_one_line_and_the_rerun_resumes(tmp_path, capsys):
    with tmpfs(tmp_path / "store", 2048) as disk:
        uri = f"sqlite:///{disk / 'mlflow.db'}"
        prepare_store(uri)
        # forward passes: the channel probe, case0, then case1 fills the disk
        model = _model(tmp_path / "model", disk / "filler", fill_at=3)
        overrides = [
            *base_overrides(uri, model, _cases(tmp_path), "full"),
            f"model.allow_globals=[{FILLING}]",
        ]
        full = run_in_process(uri, tmp_path / "out", overrides, capsys)
        assert full.outcome.code == 1
        lines = full.error_lines
        assert len(lines) == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
        line = lines[0]
        assert str(disk) in line and "cannot write to the store" in line
        assert "database or disk is full" in line or "No space left on device" in line
        assert f"the per-case rows so far are kept in {tmp_path / 'out' / 'per_case.csv'}" in line
        kept = (tmp_path / "out" / "per_case.csv").read_text().splitlines()
        assert len(kept) >= 2  # header + case0 at least
        (disk / "filler").unlink()  # room again
        (disk / "filler.armed").unlink()
        client = MlflowClient(tracking_uri=uri)
        first = client.get_run(full.outcome.run_id)
        assert first.info.status in ("FAILED", "RUNNING")
        if first.info.status == "RUNNING":
            assert "could not be closed" in line and "the same command marks it KILLED" in line
        again = run_in_process(uri, tmp_path / "out", overrides, capsys)
        assert again.outcome.code == 0, again.stderr[-3000:]
        assert sorted(again.table["case"]) == ["case0", "case1", "case2"]
        assert again.run.data.tags["evalharness.resumed_from"] == first.info.run_id
        assert client.get_run(first.info.run_id).info.status in ("FAILED", "KILLED")


def test_a_full_outputs_folder_names_the_file_and_fails_the_run(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    with tmpfs(out / "predictions", 1024) as predictions:
        model = _model(tmp_path / "model", predictions / "filler", fill_at=3)
        overrides = [
            *base_overrides(uri, model, _cases(tmp_path), "outputs"),
            f"model.allow_globals=[{FILLING}]",
            "output.save_predictions=true",
        ]
        result = run_in_process(uri, out, overrides, capsys)
    assert result.outcome.code == 1 and "Traceback" not in result.stderr
    assert len(result.error_lines) == 1, result.stderr[-3000:]
    line = result.error_lines[0]
    assert line.startswith(f"error: {predictions}/case1_pred.nii.gz") and line.endswith(
        ": cannot write (No space left on device)"
    )
    assert result.run.info.status == "FAILED"
    assert result.run.data.tags["evalharness.error"] == line[len("error: ") :]
    assert list(result.table["case"])[:1] == ["case0"]  # logged to the store: kept


def test_read_only_artifacts_with_a_writable_database(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    prepare_store(uri)
    model = tmp_path / "model.pt"
    torch.save(threshold_model(), model)
    with tmpfs(tmp_path / "store" / "mlartifacts", 64, read_only=True) as artifacts:
        result = run_in_process(
            uri, tmp_path / "out", base_overrides(uri, model, _cases(tmp_path), "ro"), capsys
        )
        assert result.outcome.code == 1 and "Traceback" not in result.stderr
        assert len(result.error_lines) == 1, result.stderr[-3000:]
        line = result.error_lines[0]
        assert line.startswith(f"error: artifact {artifacts}/")
        assert line.endswith(os.strerror(errno.EROFS) + ")") or "Read-only file system" in line
        assert result.run.info.status == "FAILED"
        assert result.run.data.tags["evalharness.error"].startswith(f"artifact {artifacts}/")

"""Shared fixtures: real MLflow stores in a temporary folder (file and SQLite backends)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "fastmonai-0.12-binary"


@pytest.fixture(params=["file", "sqlite"])
def tracking_uri(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch) -> str:
    """An absolute URI of an empty local MLflow store, for each backend."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    if request.param == "file":
        return (tmp_path / "mlruns").as_uri()
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def sqlite_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"

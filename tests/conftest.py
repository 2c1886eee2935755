"""Shared fixtures: real MLflow stores in a temporary folder (file and SQLite backends)."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "fastmonai-0.12-binary"


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite database, created once per session: creating one runs every
    schema migration (seconds each time, on every new store); `sqlite_store` copies it."""
    path = tmp_path_factory.mktemp("sqlite-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments(max_results=1)
    return path


def sqlite_store(migrated: Path, path: Path) -> str:
    """The URI of a new, empty SQLite store at `path`: a copy of the migrated database whose
    Default experiment keeps its artifacts beside it (as if first opened from that folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(migrated, path)
    location = str(path.parent.absolute() / "mlruns" / "0")
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", [location]
        )
    return f"sqlite:///{path}"


@pytest.fixture(params=["file", "sqlite"])
def tracking_uri(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch, migrated_sqlite: Path
) -> str:
    """An absolute URI of an empty local MLflow store, for each backend."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    if request.param == "file":
        return (tmp_path / "mlruns").as_uri()
    return sqlite_store(migrated_sqlite, tmp_path / "mlflow.db")


@pytest.fixture
def sqlite_uri(tmp_path: Path, migrated_sqlite: Path) -> str:
    return sqlite_store(migrated_sqlite, tmp_path / "mlflow.db")


@pytest.fixture(scope="session")
def tiny_demo_cache(tmp_path_factory: pytest.TempPathFactory, migrated_sqlite: Path) -> Path:
    """A `demo.cache_dir` holding the TINY demo (data and trained model), built once per
    session: evaluations given `demo.size=tiny demo.cache_dir=<it>` only log its training run
    into their own store (tests/demo/ builds its own, to test building)."""
    from evalharness.demo.build import ensure_demo
    from evalharness.demo.spec import TINY

    root = tmp_path_factory.mktemp("tiny-demo")
    ensure_demo(root / "cache", sqlite_store(migrated_sqlite, root / "mlflow.db"), spec=TINY)
    return root / "cache"

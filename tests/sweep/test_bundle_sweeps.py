"""Sweeps over MONAI bundles through the real CLI (`python -m evalharness -m ...`): a sweep of a
bundle's overlap and blending mode shares its forward passes within each overlap; a sweep over a
bundle and a fastMONAI model compares them with the paired tests, as a sweep over any models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from bundles import METADATA_CONTENT, write_bundle
from conftest import FIXTURE, REPO
from mlflow.tracking import MlflowClient
from tiny import ball, write_dataset


def sweep(workdir: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    command = [
        sys.executable,
        "-m",
        "evalharness",
        "-m",
        f"mlflow.tracking_uri={uri}",
        f"mlflow.experiment={name}",
        f"hydra.sweep.dir={workdir / name}",
        "inference.device=cpu",
        "output.plots=false",
        "data=decathlon",
        *overrides,
    ]
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600
    )


def children(workdir: Path, name: str):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    kinds = {
        k: [r for r in found if r.data.tags.get("evalharness.kind") == k]
        for k in ("sweep", "evaluation")
    }
    return client, kinds["sweep"], kinds["evaluation"]


def test_overlap_and_mode_share_forward_passes(tmp_path: Path) -> None:
    label = ball((20, 18, 12), radius=5)
    cases = {
        f"c{i}": (np.roll(label, i, 0).astype(np.float32), np.roll(label, i, 0)) for i in range(3)
    }
    data = write_dataset(tmp_path / "data", cases)
    bundle = write_bundle(tmp_path / "bundle")
    done = sweep(
        tmp_path,
        "bundle_grid",
        "model=bundle",
        f"model.path={bundle}",
        f"data.root={data}",
        "data.split.method=all",
        "patch.overlap=0.25,0.5",
        "inference.aggregation=average,gaussian",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _, parents, runs = children(tmp_path, "bundle_grid")
    assert len(parents) == 1 and len(runs) == 4
    by_overlap: dict[str, list] = {}
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["evalharness.model_loader"] == "bundle_state_dict"
        by_overlap.setdefault(run.data.params["patch.overlap"], []).append(run.data.metrics)
    assert sorted(by_overlap) == ["0.25", "0.5"]
    for metrics in by_overlap.values():  # per overlap: one pays the passes, the other reuses them
        executed = sorted(m["forward_passes"] for m in metrics)
        reused = sorted(m["forward_passes_reused"] for m in metrics)
        assert executed[0] == 0 and executed[1] > 0 and reused == [0, executed[1]]


def test_a_bundle_and_a_fastmonai_model_compared_with_paired_tests(tmp_path: Path) -> None:
    metadata = json.loads(json.dumps(METADATA_CONTENT))
    metadata["network_data_format"]["outputs"]["pred"]["channel_def"]["1"] = "left atrium"
    bundle = write_bundle(tmp_path / "bundle", metadata=metadata)
    fastmonai = FIXTURE / "training_run" / "model" / "best_model.safetensors"
    done = sweep(
        tmp_path,
        "versus",
        "model=file",
        f"model.path={bundle},{fastmonai}",
        f"data.root={FIXTURE / 'Task02_HeartSynth'}",
        "data.split.method=file",
        "data.split.file=../training_run/split.csv",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client, parents, runs = children(tmp_path, "versus")
    loaders = sorted(r.data.tags["evalharness.model_loader"] for r in runs)
    assert loaders == ["bundle_state_dict", "safetensors"]
    stats = json.loads(
        Path(
            client.download_artifacts(
                parents[0].info.run_id, "comparison_stats.json", str(tmp_path)
            )
        ).read_text()
    )
    assert len(stats["tests"]) == 1
    test = stats["tests"][0]
    assert sorted(test["cases"]) == ["la_001", "la_005"] and test["n_cases"] == 2
    assert 0 < test["p_value"] <= 1 and test["p_holm"] >= test["p_value"]  # a paired Wilcoxon
    assert "Wilcoxon" in done.stdout
    assert {stats["best"]["setting"], test["setting"]} == {f"path={bundle}", f"path={fastmonai}"}

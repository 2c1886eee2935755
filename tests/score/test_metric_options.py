"""The metrics config group end to end: intervals, lesion-wise and calibration columns, the
printed summary, the reliability diagram, and validation of the group's keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from tiny import SHAPE, ball, base_overrides, compose_config, threshold_model, write_dataset

from evalharness.cli import config_from, evaluate_config
from evalharness.config.validate import validate
from evalharness.errors import ConfigError


def lesion_case(shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Image = what the threshold model predicts: the ball and a false-positive speck; the
    label adds a lesion the image lacks (a miss). `shift` varies the cases a little."""
    label = ball(radius=2.5 + 0.5 * shift)
    image = label.astype(np.float32)
    image[0:2, 0:2, 0:2] = 1.0  # predicted, not in the reference: one false-positive lesion
    label[10:12, 0:2, 6:8] = 1  # in the reference, not predicted: one missed lesion
    return image, label


def run(uri: str, tmp_path: Path, capsys, n_cases: int, *overrides: str):
    model = tmp_path / "model.pt"
    torch.save(threshold_model(), model)
    root = write_dataset(tmp_path / "data", {f"c{i}": lesion_case(i % 2) for i in range(n_cases)})
    base = base_overrides(uri, model, root, "metrics")
    cfg = compose_config(*base, *overrides)
    capsys.readouterr()
    outcome = evaluate_config(cfg, tmp_path / "out")
    printed = capsys.readouterr().out
    client = MlflowClient(tracking_uri=uri)
    return outcome, client.get_run(outcome.run_id), printed, client


def test_lesion_wise_and_calibration_reach_the_run(sqlite_uri: str, tmp_path: Path, capsys) -> None:
    outcome, logged, printed, client = run(
        sqlite_uri,
        tmp_path,
        capsys,
        3,
        "metrics.lesion_wise=true",
        "metrics.calibration=true",
        "metrics.bootstrap_resamples=500",
        "output.plots=true",
    )
    assert outcome.code == 0
    metrics, params = logged.data.metrics, logged.data.params
    # every case: two reference lesions, one found; one false positive
    assert metrics["lesion_tp_mean"] == 1 and metrics["lesion_fn_mean"] == 1
    assert metrics["lesion_fp_mean"] == 1 and metrics["lesion_f1_mean"] == pytest.approx(0.5)
    for name in ("dsc", "hd95_mm", "lesion_f1", "lesion_dsc", "ece", "brier"):
        low, high = metrics[f"{name}_mean_ci95_low"], metrics[f"{name}_mean_ci95_high"]
        assert low <= metrics[f"{name}_mean"] <= high, name
    assert 0 <= metrics["ece_mean"] <= 1 and metrics["n_undefined_ece"] == 0
    assert params["metrics.missing"] == "worst" and params["metrics.bootstrap_seed"] == "0"
    plots = {a.path for a in client.list_artifacts(logged.info.run_id, "plots")}
    assert {"plots/metrics.png", "plots/reliability.png"} <= plots
    assert "Mean over cases [95% bootstrap interval over cases]:" in printed
    dsc_line = next(line for line in printed.splitlines() if line.strip().startswith("dsc_mean"))
    assert f"[{metrics['dsc_mean_ci95_low']:.3f}, {metrics['dsc_mean_ci95_high']:.3f}]" in dsc_line
    assert "lesion_f1_mean" in printed and "ece_mean" in printed


def test_two_cases_print_undefined_intervals(sqlite_uri: str, tmp_path: Path, capsys) -> None:
    outcome, logged, printed, _ = run(sqlite_uri, tmp_path, capsys, 2, "metrics.missing=nan")
    assert outcome.code == 0
    assert "dsc_mean" in logged.data.metrics
    assert "dsc_mean_ci95_low" not in logged.data.metrics  # undefined: not logged (not finite)
    assert "[interval undefined]" in printed
    assert "intervals undefined: fewer than 3 cases" in printed
    assert logged.data.params["metrics.missing"] == "nan"
    assert "lesion_f1_mean" not in logged.data.metrics  # opt-in


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("metrics.missing=zero", "metrics.missing='zero': expected one of nan, worst"),
        ("metrics.lesion_min_iou=1.5", "metrics.lesion_min_iou=1.5"),
        (
            "metrics.lesion_size_bins_mm3=[100,10]",
            "metrics.lesion_size_bins_mm3=[100.0, 10.0]: expected increasing",
        ),
        ("metrics.bootstrap_resamples=10", "metrics.bootstrap_resamples=10: expected >= 100"),
        ("metrics.calibration_bins=1", "metrics.calibration_bins=1: expected >= 2"),
    ],
)
def test_bad_metrics_options_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        validate(config_from(compose_config(override)))


def test_shape_constant_is_what_the_lesion_case_assumes() -> None:
    assert SHAPE == (12, 10, 8)  # the missed lesion at [10:12, 0:2, 6:8] lies inside

"""What a person sees first in MLflow: experiment kind, the dataset input, the summary pages,
the run's description, the headline metric order and the gallery of the worst cases (pure
functions and real local stores; `test_mlflow_ui.py` checks the same through a real server)."""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from html_pages import sources
from mlflow.tracking import MlflowClient

from evalharness.checks.mismatches import Mismatch
from evalharness.config import schema
from evalharness.config.validate import validate
from evalharness.data.datasets import Case, Dataset
from evalharness.errors import ConfigError
from evalharness.plots.gallery import plot_gallery
from evalharness.plots.summary_html import Figure, run_note, run_page, sweep_page
from evalharness.score.worst_cases import WorstCases, largest_error, with_image
from evalharness.track import tracking
from evalharness.track.datasets import (
    case_frame,
    cases_dataset,
    dataset_name,
    evaluation_dataset,
    log_evaluation_dataset,
    split_name,
)
from evalharness.track.summaries import HEADLINE_SECTION, headline_first, sweep_note

SHAPE = (14, 12, 10)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def box(lo: tuple[int, int, int], hi: tuple[int, int, int], shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return mask


def case(name: str, root: Path = Path("/data/Task02_Heart")) -> Case:
    return Case(name, root / "imagesTr" / f"{name}.nii.gz", root / "labelsTr" / f"{name}.nii.gz")


# --------------------------------------------------------------------------------------------
# experiment kind


def test_experiments_get_the_model_training_kind_unless_one_was_set(sqlite_uri: str) -> None:
    client = tracking.prepare_store(sqlite_uri)
    created = tracking.experiment_id(client, sqlite_uri, "new")
    untagged = client.create_experiment("old")  # made before the harness logged into it
    user_set = client.create_experiment("mine", tags={"mlflow.experimentKind": "genai_development"})
    assert tracking.experiment_id(client, sqlite_uri, "old") == untagged
    assert tracking.experiment_id(client, sqlite_uri, "mine") == user_set
    kind = {
        e: client.get_experiment(e).tags.get("mlflow.experimentKind")
        for e in (created, untagged, user_set)
    }
    assert kind == {
        created: "custom_model_development",
        untagged: "custom_model_development",
        user_set: "genai_development",
    }


# --------------------------------------------------------------------------------------------
# dataset input


def test_dataset_rows_are_relative_to_the_root_and_the_digest_follows_the_cases() -> None:
    root = Path("/data/Task02_Heart")
    cases = [case("la_003"), Case("la_004", root / "imagesTr" / "la_004.nii.gz", None)]
    frame = case_frame(cases, root, "test")
    assert frame.to_dict("records") == [
        {
            "case": "la_003",
            "image": "imagesTr/la_003.nii.gz",
            "label": "labelsTr/la_003.nii.gz",
            "split": "test",
        },
        {"case": "la_004", "image": "imagesTr/la_004.nii.gz", "label": "", "split": "test"},
    ]
    first = evaluation_dataset(cases, root, "Task02_Heart/test", "test")
    moved_root = Path("/elsewhere/Task02_Heart")  # the same cases on another machine
    moved = [
        case("la_003", moved_root),
        Case("la_004", moved_root / "imagesTr" / "la_004.nii.gz", None),
    ]
    assert evaluation_dataset(moved, moved_root, "Task02_Heart/test", "test").digest == first.digest
    fewer = evaluation_dataset(cases[:1], root, "Task02_Heart/test", "test")
    assert fewer.digest != first.digest


def test_dataset_names_say_task_and_split() -> None:
    root = Path("/data/Task02_Heart")
    assert dataset_name(root, split_name("decathlon")) == "Task02_Heart/test"
    assert (
        dataset_name(Path("/data"), split_name("file", "val"), task="Task09_Spleen")
        == "Task09_Spleen/val"
    )
    assert dataset_name(Path("/cache/data"), split_name("all"), demo=True) == "demo/all"
    assert split_name("sklearn") == "test" and split_name("file", None) == "test"
    dataset = Dataset((case("la_003"),), {0: "background", 1: "heart"}, root, "decathlon")
    assert cases_dataset(dataset, "decathlon", None, "test").name == "Task02_Heart/test"


def test_dataset_input_is_logged_with_the_evaluation_context(tracking_uri: str) -> None:
    client = tracking.prepare_store(tracking_uri)
    experiment = tracking.experiment_id(client, tracking_uri, "e")
    root = Path("/data/Task02_Heart")
    runs = [client.create_run(experiment).info.run_id for _ in range(2)]
    for run_id in runs:
        dataset = evaluation_dataset(
            [case("la_003"), case("la_007")], root, "Task02_Heart/test", "test"
        )
        log_evaluation_dataset(client, run_id, dataset)
    inputs = [MlflowClient(tracking_uri).get_run(r).inputs.dataset_inputs for r in runs]
    assert [len(i) for i in inputs] == [1, 1]
    logged = [i[0] for i in inputs]
    assert {d.dataset.name for d in logged} == {"Task02_Heart/test"}
    assert logged[0].dataset.digest == logged[1].dataset.digest
    assert {(t.key, t.value) for t in logged[0].tags} == {("mlflow.data.context", "evaluation")}
    assert '"num_rows": 2' in logged[0].dataset.profile


# --------------------------------------------------------------------------------------------
# worst cases and the gallery


def test_largest_error_is_on_the_biggest_error_blob() -> None:
    reference = box((2, 2, 2), (8, 8, 8))
    prediction = reference.copy()
    prediction[2:8, 2:8, 2:4] = False  # missed slab: 72 voxels
    prediction[11:13, 1:3, 1:3] = True  # false-positive speck: 8 voxels
    (x, y, z), size = largest_error(reference, prediction)
    assert size == 72 and 2 <= x < 8 and 2 <= y < 8 and 2 <= z < 4
    centre, size = largest_error(reference, reference)  # no error: through the reference
    assert size == 0 and all(c in (4, 5) for c in centre)
    empty = np.zeros(SHAPE, bool)
    assert largest_error(empty, empty) == ((7, 6, 5), 0)


def test_worst_cases_keep_k_per_label_as_2d_planes() -> None:
    worst = WorstCases(2)
    reference = box((2, 2, 2), (8, 8, 8)).astype(np.uint8)
    reference[10:13, 8:11, 6:9] = 2
    scores = {"a": (0.9, 0.5), "b": (0.4, 0.8), "c": (0.7, 0.2), "d": (0.4, 0.9)}
    for name, (dsc1, dsc2) in scores.items():
        prediction = reference.copy()
        prediction[2:4, 2:8, 2:8] = 0  # a miss in label 1
        rows = [
            {"case": name, "label": 1, "dsc": dsc1, "status": "ok"},
            {"case": name, "label": 2, "dsc": dsc2, "status": "ok"},
            {"case": name, "label": 3, "dsc": math.nan, "status": "ok"},
        ]
        worst.offer(case(name), prediction, reference, (1.0, 1.5, 2.0), rows)
    worst.offer(
        case("e"),
        reference,
        reference,
        (1.0, 1.0, 1.0),
        [{"label": 1, "dsc": 0.0, "status": "failed"}],
    )
    kept = worst.by_label()
    assert sorted(kept) == [1, 2]  # NaN scores and failed rows are not ranked
    assert [(e.case.case_id, e.dsc) for e in kept[1]] == [
        ("b", 0.4),
        ("d", 0.4),
    ]  # tie: earlier first
    assert [e.case.case_id for e in kept[2]] == ["c", "a"]
    entry = kept[1][0]
    assert entry.error_voxels == 2 * 6 * 6 and entry.centre_vox[0] in (2, 3)
    for planes in (entry.reference, entry.prediction):
        assert [p.shape for p in planes] == [(14, 12), (14, 10), (12, 10)]
    x, y, z = entry.centre_vox
    assert np.array_equal(entry.reference[0], reference[:, :, z] == 1)
    assert np.array_equal(entry.reference[2], reference[x] == 1) and entry.reference[2].any()
    assert not entry.prediction[2].any()  # the sagittal plane lies in the miss
    image = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    filled = with_image(entry, image)
    assert np.array_equal(filled.image[1], image[:, y, :])
    with pytest.raises(ValueError, match="differs from the grid"):
        with_image(entry, image[:-1])


def test_gallery_draws_image_reference_and_prediction(tmp_path: Path) -> None:
    worst = WorstCases(3)
    reference = box((3, 3, 3), (10, 9, 8)).astype(np.uint8)
    prediction = np.roll(reference, 3, axis=0)
    worst.offer(
        case("la_003"),
        prediction,
        reference,
        (1.0, 1.0, 1.0),
        [{"label": 1, "dsc": 0.5, "status": "ok"}],
    )
    image = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    entries = {1: [with_image(e, image) for e in worst.by_label()[1]]}
    (path,) = plot_gallery(entries, tmp_path / "gallery", {1: "heart"})
    assert path.name == "label1_worst1_la_003.png" and path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = mpimg.imread(path)[..., :3]
    green = (pixels[..., 1] > 0.6) & (pixels[..., 0] < 0.3) & (pixels[..., 2] < 0.5)
    red = (pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.3)
    assert green.sum() > 50 and red.sum() > 50  # both outlines are drawn


# --------------------------------------------------------------------------------------------
# pages, description and metric order


def per_case() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "case": ["la_003", "la_007", "la_009"],
            "label": [1, 1, 1],
            "dsc": [0.91, 0.42, math.nan],
            "hd95_mm": [2.0, math.inf, math.nan],
            "status": ["ok", "ok", "failed"],
            "error": ["", "", "<img> is truncated"],
        }
    )


SUMMARY = {
    "n_cases": 3.0,
    "n_failed_cases": 1.0,
    "dsc_mean": 0.665,
    "dsc_std": 0.245,
    "dsc_median": 0.665,
    "hd95_mm_mean": 2.0,
    "seconds_per_case": 1.5,
}
FINDING = Mismatch(
    "data", "mirror_probe", None, "x", "error", "prediction looks mirrored", "la_007"
)


def test_run_page_is_self_contained_with_figures_inline(tmp_path: Path) -> None:
    png = PNG_SIGNATURE + b"fake"
    page = run_page(
        "Evaluation on Task02_Heart/test",
        {"model": "runs:/abc/model/best_learner.pkl"},
        SUMMARY,
        per_case(),
        [FINDING.as_dict()],
        figures=[Figure("metrics.png", png)],
        gallery=[Figure("label 1, worst 1: la_007", png)],
    )
    found = sources(page)
    assert found.scripts == 0
    assert found.urls == [f"data:image/png;base64,{base64.b64encode(png).decode()}"] * 2
    assert "0.665" in page and "la_007" in page and "prediction looks mirrored" in page
    assert "&lt;img&gt; is truncated" in page  # cell text is escaped
    assert "Preprocessing mismatches: 1 (1 error(s), 0 warning(s), 0 info)" in page
    assert "95% CI" not in page  # no interval in the summary: none shown
    with_ci = run_page(
        "t", {}, {**SUMMARY, "dsc_mean_ci95_low": 0.5, "dsc_mean_ci95_high": 0.8}, per_case(), []
    )
    assert "95% CI" in with_ci and "0.500–0.800" in with_ci


def test_run_note_has_three_lines() -> None:
    note = run_note(
        {**SUMMARY, "dsc_mean_ci95_low": 0.5, "dsc_mean_ci95_high": 0.8},
        ("la_007", 0.42),
        [FINDING.as_dict()],
    )
    assert note.splitlines() == [
        "- **Mean DSC 0.665** (95% CI 0.500–0.800) over 3 cases, 1 failed",
        "- Worst case: la_007 (DSC 0.420)",
        "- Preprocessing mismatches: 1 (1 error(s), 0 warning(s), 0 info)",
    ]
    assert run_note(SUMMARY, None, []).splitlines()[2] == "- Preprocessing mismatches: 0"


def test_sweep_page_shows_best_ties_and_cost_figure() -> None:
    table = pd.DataFrame(
        {
            "setting": ["overlap=0.25", "overlap=0.5", "overlap=0.75"],
            "status": ["finished", "finished", "failed"],
            "dsc_mean": [0.71, 0.70, math.nan],
            "dsc_mean_ci95_low": [0.6, 0.6, math.nan],
            "dsc_mean_ci95_high": [0.8, 0.8, math.nan],
            "n_failed_cases": [0.0, 1.0, math.nan],
            "error": ["", "", "patch too large"],
        }
    )
    stats = {
        "primary_metric": "dsc_mean",
        "direction": "max",
        "best": {"setting": "overlap=0.25", "run_id": "r1", "value": 0.71},
        "tied_with_best": ["overlap=0.5"],
        "tests": [
            {
                "setting": "overlap=0.5",
                "n_cases": 4,
                "median_difference": 0.01,
                "median_difference_ci95": [-0.002, 0.03],
                "p_value": 0.62,
                "p_holm": 0.93,
            }
        ],
        "test_metric": "dsc",
        "n_settings": 3,
        "n_failed": 1,
        "n_skipped": 0,
    }
    png = PNG_SIGNATURE + b"x"
    page = sweep_page(
        "Sweep s",
        {},
        table,
        stats,
        [Figure("accuracy_cost.png", png)],
        [Figure("compare_dsc.png", png)],
    )
    assert sources(page).scripts == 0
    assert (
        '<tr class="best"><td>overlap=0.25' in page and '<tr class="tied"><td>overlap=0.5' in page
    )
    assert "Settings tied with the best: overlap=0.5" in page
    assert "<th>dsc_mean [95% CI]</th>" in page  # the interval beside its mean, one column
    assert '<td class="num">0.7100 [0.6000 – 0.8000]</td>' in page  # 4 decimals: 0.001 shows
    tests_row = '<td class="num">-0.0020 – 0.0300</td><td class="num">0.620</td>'
    assert "<th>p</th><th>Holm p</th>" in page and tests_row + '<td class="num">0.930</td>' in page
    assert page.count("<table") == page.count('<div class="table"><table')  # scroll inside
    assert page.index("Accuracy against cost") < page.index("compare_dsc.png")
    assert "patch too large" in page and "0.620" in page
    assert '<td class="num">1</td>' in page and "1.000" not in page  # counts without decimals
    without = sweep_page(
        "Sweep s", {}, table, {k: v for k, v in stats.items() if k != "tied_with_best"}
    )
    assert "tied with the best" not in without
    assert sweep_note(stats).splitlines()[:2] == [
        "- **Best: overlap=0.25** (dsc_mean 0.7100)",
        "- Tied with the best: overlap=0.5",
    ]


def test_headline_metrics_are_logged_first(sqlite_uri: str) -> None:
    summary = {
        "n_cases": 4.0,
        "assd_mm_mean": 1.0,
        "dsc_mean": 0.8,
        "dsc_mean_ci95_low": 0.7,
        "dsc_mean_ci95_high": 0.9,
        "hd95_mm_mean": 3.0,
        "rve_mean": 0.1,
    }
    ordered = headline_first(summary)
    assert list(ordered)[:6] == [
        "dsc_mean",
        "hd95_mm_mean",
        "rve_mean",
        "dsc_mean_ci95_low",
        "dsc_mean_ci95_high",
        f"{HEADLINE_SECTION}/dsc_mean",
    ]
    assert set(ordered) - set(summary) == {
        f"{HEADLINE_SECTION}/{m}" for m in ("dsc_mean", "hd95_mm_mean", "rve_mean")
    }
    client = tracking.prepare_store(sqlite_uri)
    run_id = client.create_run(tracking.experiment_id(client, sqlite_uri, "e")).info.run_id
    tracking.log_metrics(client, run_id, ordered)
    assert list(client.get_run(run_id).data.metrics)[:2] == [
        "dsc_mean",
        "hd95_mm_mean",
    ]  # store order


def test_gallery_k_must_not_be_negative() -> None:
    def config(gallery_k: int) -> schema.EvalConfig:
        return schema.from_mapping(schema.EvalConfig, {"output": {"gallery_k": gallery_k}})

    validate(config(0))
    with pytest.raises(ConfigError, match=re.escape("output.gallery_k=-1: expected >= 0")):
        validate(config(-1))

"""Bad input, one test each: a one-line error naming the file, case or key and what was
expected; a non-zero exit; no run for a configuration that cannot start (validation, an
unknown run, missing data, a model that does not load), a FAILED run with the reason as a tag
for one that started (or, for one case, a failure row while the other cases go on); never a
traceback.

Most run in-process (`run.evaluate` on the composed config); a few go through the real CLI to
show what the user's terminal shows.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, sqlite_store
from mlflow.tracking import MlflowClient
from tiny import (
    AFFINE,
    SHAPE,
    Result,
    ball,
    base_overrides,
    good_case,
    run_in_process,
    threshold_model,
    write_dataset,
)

from evalharness.cli import unparsable_override
from evalharness.data.nifti_io import write_nifti

IMAGE, LABEL = Path("imagesTr/bad.nii.gz"), Path("labelsTr/bad.nii.gz")


@dataclass(frozen=True)
class World:
    """Shared by every test: a model file, a store, and a training run logged in it."""

    folder: Path
    model: Path
    uri: str
    training_run: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, migrated_sqlite: Path) -> World:
    folder = tmp_path_factory.mktemp("world")
    model = folder / "model.pt"
    torch.save(threshold_model(), model)
    uri = sqlite_store(migrated_sqlite, folder / "mlflow.db")
    client = MlflowClient(tracking_uri=uri)
    training = client.create_run(client.create_experiment("training")).info.run_id
    (folder / "notes.txt").write_text("not a model")
    for path in (model, folder / "notes.txt"):
        client.log_artifact(training, str(path), "model")
    client.set_terminated(training)
    return World(folder, model, uri, training)


def evaluate(
    world: World, tmp_path: Path, capsys, *overrides: str, root: Path | None = None
) -> Result:
    """Evaluate in its own experiment (named after the test's folder), `root` as the data."""
    root = root or write_dataset(tmp_path / "data", {"ok": good_case()})
    model = None if any(o.startswith("model=") for o in overrides) else world.model
    base = base_overrides(world.uri, model, root, tmp_path.name)
    return run_in_process(world.uri, tmp_path / "out", [*base, *overrides], capsys)


def assert_one_error(result: Result, *expected: str) -> None:
    """Exit 1, one `error:` line holding every `expected` text, no traceback."""
    assert result.outcome.code == 1
    assert "Traceback" not in result.stderr
    assert len(result.error_lines) == 1, result.stderr
    for text in expected:
        assert text in result.error_lines[0]


def no_run(world: World, experiment: str) -> bool:
    """No run in `experiment` (or no such experiment): the configuration never started."""
    client = MlflowClient(tracking_uri=world.uri)
    found = client.get_experiment_by_name(experiment)
    return found is None or not client.search_runs([found.experiment_id])


def assert_not_started(result: Result, world: World, experiment: str, *expected: str) -> None:
    """`assert_one_error`, and no run at all in `experiment` (the configuration never started)."""
    assert_one_error(result, *expected)
    assert result.outcome.run_id is None
    assert no_run(world, experiment)


def assert_run_failed(result: Result, *expected: str) -> None:
    """`assert_one_error`, the run FAILED with the line as its tag."""
    assert_one_error(result, *expected)
    assert result.run is not None and result.run.info.status == "FAILED"
    assert result.run.data.tags["evalharness.error"] == result.error_lines[0][len("error: ") :]


# ----------------------------------------------------------------------------- one bad case


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _noisy_then_truncated(root: Path) -> None:
    """Noise does not compress: half the file still holds the header, not all the voxels."""
    noise = np.random.default_rng(0).normal(size=ball().shape).astype(np.float32)
    write_nifti(root / IMAGE, ball() + noise, AFFINE)
    _truncate(root / IMAGE)


def _write(relative: Path, data: np.ndarray) -> Callable[[Path], None]:
    return lambda root: write_nifti(root / relative, data, AFFINE)


def _with_voxel(value: float) -> np.ndarray:
    image = ball().astype(np.float32)
    image[0, 0, 0] = value
    return image


def _folder_at(relative: Path) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        (root / relative).unlink()
        (root / relative).mkdir()

    return mutate


def _header_shorter_than_data(root: Path) -> None:
    """The header says 7 slices, the file holds 8 (the data would be silently cut)."""
    image = nib.load(str(root / IMAGE))
    data = np.asarray(image.dataobj)
    header = image.header.copy()
    header.set_data_shape(data.shape[:2] + (data.shape[2] - 1,))
    raw = gzip.decompress((root / IMAGE).read_bytes())
    (root / IMAGE).write_bytes(gzip.compress(header.binaryblock + raw[len(header.binaryblock) :]))


def _claims_terabytes(root: Path) -> None:
    """A small file whose header claims 30000^3 float32 voxels (a hostile or corrupt header,
    or a gzip bomb): reading it would exhaust the memory."""
    image = nib.load(str(root / IMAGE))
    header = image.header.copy()
    header.set_data_shape((30000, 30000, 30000))
    raw = gzip.decompress((root / IMAGE).read_bytes())
    (root / IMAGE).write_bytes(gzip.compress(header.binaryblock + raw[len(header.binaryblock) :]))


def _sheared(root: Path) -> None:
    """A gantry-tilted CT: only the sform holds the (sheared) geometry."""
    affine = AFFINE.copy()
    affine[:3, 2] += 0.3 * np.linalg.norm(AFFINE[:3, 2]) * AFFINE[:3, 0] / 1.5
    image = nib.Nifti1Image(ball().astype(np.float32), affine)
    image.set_sform(affine, code=1)
    image.set_qform(None, code=0)
    nib.save(image, str(root / IMAGE))


BAD_CASES = {  # mutation of the 'bad' case -> (file the error names, what it says was expected)
    "truncated image": (_noisy_then_truncated, IMAGE, "file is truncated (expected 4192 bytes"),
    "truncated label header": (
        lambda root: _truncate(root / LABEL),
        LABEL,
        "file is truncated (expected a NIfTI header",
    ),
    "not a NIfTI image": (
        lambda root: (root / IMAGE).write_text("patient name, not voxels"),
        IMAGE,
        "cannot read image",
    ),
    "missing image": (lambda root: (root / IMAGE).unlink(), IMAGE, "image file not found"),
    "missing label": (lambda root: (root / LABEL).unlink(), LABEL, "label file not found"),
    "non-integer label": (
        _write(LABEL, ball().astype(np.float32) * 0.5),
        LABEL,
        "non-integer values",
    ),
    "label outside the label set": (
        _write(LABEL, ball() * 3),
        LABEL,
        "label values [3] are not among the dataset's labels [0, 1]",
    ),
    "image/label grid mismatch": (
        _write(LABEL, ball()[:-1]),
        LABEL,
        "grids differ in shape",
    ),
    "2-D image": (_write(IMAGE, ball()[:, :, 0]), IMAGE, "expected a 3-D or 4-D image, got 2-D"),
    "4-D image, 2 channels for a 1-channel model": (
        _write(IMAGE, np.stack([ball(), ball()], axis=-1).astype(np.float32)),
        IMAGE,
        "the image has 2 channel(s); the model expects 1",
    ),
    "label path is a folder": (_folder_at(LABEL), LABEL, "is a folder, expected a label file"),
    "more voxel data than the header's dimensions": (
        _header_shorter_than_data,
        IMAGE,
        "holds more voxel data than its header's dimensions 12x10x7 describe",
    ),
    "header dims beyond any host's memory": (
        _claims_terabytes,
        IMAGE,
        "MB (header dimensions 30000x30000x30000 of float32), more than the",
    ),
    "sheared grid (gantry tilt)": (
        _sheared,
        IMAGE,
        "sheared voxel grid (its axes are 16.7 degrees from orthogonal",
    ),
    "NaN voxel": (_write(IMAGE, _with_voxel(np.nan)), IMAGE, "NaN or infinite voxels"),
    "Inf voxel": (_write(IMAGE, _with_voxel(np.inf)), IMAGE, "NaN or infinite voxels"),
}


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_a_bad_case_fails_alone(name: str, world: World, tmp_path: Path, capsys) -> None:
    mutate, bad_file, expected = BAD_CASES[name]
    root = write_dataset(tmp_path / "data", {"ok": good_case(), "bad": good_case()})
    mutate(root)
    result = evaluate(world, tmp_path, capsys, root=root)
    assert result.outcome.code == 2  # some case failed
    assert "Traceback" not in result.stderr
    assert result.run.info.status == "FINISHED"
    assert result.run.data.tags["evalharness.failed_cases"] == "1"
    assert result.row("ok")["status"] == "ok" and result.row("ok")["dsc"] == 1.0
    bad = result.row("bad")
    assert bad["status"] == "failed"
    assert str(root / bad_file) in bad["error"] and expected in bad["error"]
    assert "\n" not in bad["error"]


# ------------------------------------------------------------------- not errors: conventions


def test_empty_masks_small_images_follow_the_documented_conventions(
    world: World, tmp_path: Path, capsys
) -> None:
    """Empty ground truth or prediction are scored (metrics.py conventions); an image smaller
    than the patch on every axis is padded, evaluated and restored to its native grid."""
    label, zeros = ball(), np.zeros(ball().shape, np.uint8)
    small = ball((5, 4, 3), radius=1.0)
    cases = {
        "empty_gt": (label.astype(np.float32), zeros),
        "both_empty": (zeros.astype(np.float32), zeros),
        "empty_pred": (zeros.astype(np.float32), label),
        "small": (small.astype(np.float32), small),
    }
    root = write_dataset(tmp_path / "data", cases)
    result = evaluate(world, tmp_path, capsys, "output.save_predictions=true", root=root)
    assert result.outcome.code == 0 and result.run.info.status == "FINISHED"
    assert (result.table["status"] == "ok").all()
    nan = float("nan")
    # metrics.missing=worst (the default): a distance to an empty mask is the image diagonal
    worst = float(np.linalg.norm(np.asarray(SHAPE) * np.abs(np.diag(AFFINE)[:3])))
    worst_vox = float(np.linalg.norm(SHAPE))
    expected = {  # case -> metric -> value (NaN: undefined, skipped by the means)
        "empty_gt": dict(dsc=0, precision=0, nsd_1mm=0, sens=nan, ldr=nan, rve=nan),
        "both_empty": dict(dsc=1, precision=1, nsd_1mm=1, sens=1, ldr=1, rve=0, hd95_mm=0),
        "empty_pred": dict(dsc=0, precision=nan, nsd_1mm=0, sens=0, ldr=0, rve=-1),
        "small": dict(dsc=1, precision=1, nsd_1mm=1, sens=1, ldr=1, rve=0, hd95_mm=0),
    }
    for case in ("empty_gt", "empty_pred"):
        expected[case] |= dict(hd95_mm=worst, assd_mm=worst, hd95_vox=worst_vox)
    for case, metrics in expected.items():
        row = result.row(case)
        for metric, value in metrics.items():
            assert row[metric] == pytest.approx(value, nan_ok=True), (case, metric)
    assert result.run.data.params["metrics.missing"] == "worst"
    assert result.run.data.metrics["n_undefined_hd95_mm"] == 0
    assert result.run.data.metrics["n_undefined_sens"] == 1  # empty_gt
    saved = nib.load(tmp_path / "out" / "predictions" / "small_pred.nii.gz")
    assert saved.shape == small.shape and np.allclose(saved.affine, AFFINE)
    assert np.array_equal(np.asarray(saved.dataobj), small)


def test_a_one_voxel_image_fails_on_its_non_finite_input_and_calibration_goes_on(
    world: World, tmp_path: Path, capsys
) -> None:
    """z-normalising one voxel divides by a NaN standard deviation: the case fails with that
    reason (not an `ok` row with DSC 0), and calibration over the other cases still works. A
    dataset.json entry without a label is a `no_label` row that says why it is not scored."""
    one = np.ones((1, 1, 1), np.uint8)
    cases = {"ok": good_case(), "one_voxel": (one.astype(np.float32), one), "unlabelled": None}
    root = write_dataset(tmp_path / "data", {k: v or good_case() for k, v in cases.items()})
    listing = json.loads((root / "dataset.json").read_text())
    del listing["training"][2]["label"]
    (root / "dataset.json").write_text(json.dumps(listing))
    result = evaluate(
        world,
        tmp_path,
        capsys,
        "metrics.calibration=true",
        "preprocessing.normalization=[{name:ZNormalization}]",
        root=root,
    )
    assert result.outcome.code == 2 and result.run.info.status == "FINISHED"
    assert "Traceback" not in result.stderr
    assert result.row("ok")["status"] == "ok" and np.isfinite(result.row("ok")["ece"])
    failed = result.row("one_voxel")
    assert failed["status"] == "failed"
    assert "imagesTr/one_voxel.nii.gz: the normalised input is not finite" in failed["error"]
    unlabelled = result.row("unlabelled")
    assert unlabelled["status"] == "no_label"
    assert unlabelled["error"] == "no label file listed for this case (nothing to score against)"
    assert result.run.data.metrics["n_failed_cases"] == 2


# ------------------------------------------------------------------------- run-level errors


def test_unknown_run_id(world: World, tmp_path: Path, capsys) -> None:
    run_id = "0123456789abcdef0123456789abcdef"
    result = evaluate(world, tmp_path, capsys, "model=mlflow_run", f"model.run_id={run_id}")
    assert_not_started(
        result, world, tmp_path.name, f"training run '{run_id}' not found", world.uri
    )


def test_run_without_the_artifact_lists_what_it_has(world: World, tmp_path: Path, capsys):
    overrides = ("model=mlflow_run", f"model.run_id={world.training_run}")
    result = evaluate(world, tmp_path, capsys, *overrides, "model.artifact=model/best_learner.pkl")
    assert_not_started(
        result,
        world,
        tmp_path.name,
        "no artifact file 'model/best_learner.pkl'",
        "(it has: model/model.pt, model/notes.txt)",
    )


def _training_run(world: World, artifacts: list[Path], params: dict[str, str]) -> str:
    client = MlflowClient(tracking_uri=world.uri)
    experiment = client.get_experiment_by_name("training").experiment_id
    run_id = client.create_run(experiment).info.run_id
    for path in artifacts:
        client.log_artifact(run_id, str(path), "model")
    for key, value in params.items():
        client.log_param(run_id, key, value)
    client.set_terminated(run_id)
    return run_id


def test_a_model_file_is_discovered_and_its_choice_tagged(world: World, tmp_path: Path, capsys):
    overrides = ("model=mlflow_run", f"model.run_id={world.training_run}")
    result = evaluate(world, tmp_path, capsys, *overrides)
    assert result.outcome.code == 0, result.stderr
    assert result.run.data.tags["evalharness.model_artifact"] == "model/model.pt"
    assert "no fastMONAI learner" in result.run.data.tags["evalharness.model_artifact_choice"]


def test_run_with_no_loadable_model_lists_what_it_has(world: World, tmp_path: Path, capsys):
    run_id = _training_run(world, [world.folder / "notes.txt"], {})
    result = evaluate(world, tmp_path, capsys, "model=mlflow_run", f"model.run_id={run_id}")
    assert_not_started(
        result,
        world,
        tmp_path.name,
        f"run '{run_id}' has no loadable model file (looked for model/best_learner.pkl",
        "it has: model/notes.txt)",
    )


def test_a_training_transform_that_cannot_be_reproduced_stops_before_inference(
    world: World, tmp_path: Path, capsys
) -> None:
    transforms = '[{"name": "PadOrCrop", "params": {"target_shape": [8, 8, 8]}}]'
    run_id = _training_run(world, [world.model], {"transformations": transforms})
    overrides = ("model=mlflow_run", f"model.run_id={run_id}", "checks.on_mismatch=error")
    result = evaluate(world, tmp_path, capsys, *overrides)
    assert_run_failed(result, "training.transformations", "checks.on_mismatch=error")
    assert "training applied PadOrCrop(target_shape=[8, 8, 8])" in result.stderr
    assert result.table is None


def test_held_out_needs_a_training_run_with_its_split(world: World, tmp_path: Path, capsys):
    result = evaluate(world, tmp_path, capsys, "data.split.method=held_out")  # model.path only
    assert_not_started(
        result, world, tmp_path.name, "data.split.method=held_out: needs a training run"
    )
    overrides = ("model=mlflow_run", f"model.run_id={world.training_run}")
    result = evaluate(
        world, tmp_path, capsys, *overrides, "data.split.method=held_out", "mlflow.experiment=b"
    )
    assert_not_started(
        result,
        world,
        "b",
        f"training run '{world.training_run}' has no artifact 'data/train_val_split.csv'",
    )


def test_artifact_that_is_not_a_model(world: World, tmp_path: Path, capsys) -> None:
    overrides = (
        "model=mlflow_run",
        f"model.run_id={world.training_run}",
        "model.artifact=model/notes.txt",
    )
    result = evaluate(world, tmp_path, capsys, *overrides)
    assert_not_started(
        result, world, tmp_path.name, "notes.txt is not a model (expected a fastai Learner export"
    )


@pytest.mark.parametrize("artifact", ["../x", "../../x"])
def test_artifact_path_leaving_its_run(artifact: str, world: World, tmp_path: Path, capsys):
    overrides = ("model=mlflow_run", f"model.run_id={world.training_run}")
    result = evaluate(world, tmp_path, capsys, *overrides, f"model.artifact={artifact}")
    expected = f"artifact path '{artifact}' escapes the run's artifacts"
    assert_not_started(result, world, tmp_path.name, expected)


def test_output_channels_contradicting_the_labels_stop_before_inference(
    world: World, tmp_path: Path, capsys
) -> None:
    labels = {"0": "background", "1": "wall", "2": "cavity"}
    root = write_dataset(tmp_path / "data", {"ok": good_case()}, labels=labels)
    result = evaluate(world, tmp_path, capsys, "checks.on_mismatch=error", root=root)
    assert_run_failed(result, "model.out_channels", "checks.on_mismatch=error")
    assert result.table is None  # no case was evaluated
    assert result.run.data.tags["evalharness.preprocessing_mismatch"] == "true"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("patch.overlap=1.0", "patch.overlap=1.0: a fraction of the patch must lie in [0, 1)"),
        ("patch.size=[0,8,8]", "patch.size=[0, 8, 8]: expected three positive integers"),
        ("inference.aggregation=median", "inference.aggregation='median': expected one of crop"),
        ("inference.restore=nearest", "inference.restore='nearest': expected one of"),
        ("inference.max_device_memory_mb=0", "inference.max_device_memory_mb=0.0: expected > 0"),
        ("model.role=last", "model.role='last': expected one of best, final"),
    ],
)
def test_bad_config_value(override: str, expected: str, world: World, tmp_path, capsys) -> None:
    assert_not_started(evaluate(world, tmp_path, capsys, override), world, tmp_path.name, expected)


def test_data_root_without_cases(world: World, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = evaluate(world, tmp_path, capsys, root=empty)
    assert_not_started(
        result, world, tmp_path.name, f"data.root={empty}: no dataset.json", "(expected a Medical"
    )
    (empty / "dataset.json").write_text('{"labels": {"0": "background"}, "training": []}')
    result = evaluate(world, tmp_path, capsys, "mlflow.experiment=again", root=empty)
    expected = 'expected a non-empty "training" list'
    assert_not_started(result, world, "again", str(empty / "dataset.json"), expected)


def test_outputs_folder_that_cannot_be_written(world: World, tmp_path: Path, capsys) -> None:
    """A regular file where a folder should be stops root too (chmod would not)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    root = write_dataset(tmp_path / "data", {"ok": good_case()})
    base = base_overrides(world.uri, world.model, root, tmp_path.name)
    result = run_in_process(world.uri, blocker / "out", base, capsys)
    assert_not_started(
        result,
        world,
        tmp_path.name,
        f"hydra.runtime.output_dir={blocker / 'out'}",
        f"{blocker} is not a folder",
    )


def test_unreachable_tracking_server_stops_within_bounded_time(
    world: World, tmp_path: Path, capsys
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{probe.getsockname()[1]}"
    started = time.monotonic()
    result = evaluate(world, tmp_path, capsys, f"mlflow.tracking_uri={uri}")
    waited = time.monotonic() - started
    assert result.outcome.code == 1 and result.run is None  # no store: no run to mark
    assert len(result.error_lines) == 1 and f"mlflow.tracking_uri={uri}" in result.error_lines[0]
    assert "cannot reach the tracking server" in result.error_lines[0]
    assert "Traceback" not in result.stderr
    assert waited < 20, waited
    # the training store unreachable, the evaluation store fine: it cannot start, no run
    started = time.monotonic()
    training = ("model=mlflow_run", "model.run_id=abc", f"model.tracking_uri={uri}")
    result = evaluate(world, tmp_path, capsys, *training)
    assert time.monotonic() - started < 20
    assert_not_started(result, world, tmp_path.name, f"cannot read run 'abc' from {uri}")


def test_a_typo_in_the_store_scheme_a_store_that_is_no_database_and_a_deleted_experiment(
    world: World, tmp_path: Path, capsys
) -> None:
    typo = f"sqlit:///{tmp_path / 'mlflow.db'}"
    result = evaluate(world, tmp_path, capsys, f"mlflow.tracking_uri={typo}")
    assert result.outcome.code == 1 and result.run is None and "Traceback" not in result.stderr
    assert result.error_lines == [
        f"error: mlflow.tracking_uri={typo}: unknown tracking URI scheme 'sqlit' (expected "
        "sqlite:///<file>, file:<folder>, http(s)://<server>, a database URL or a path)"
    ]
    assert not (tmp_path / "mlflow.db").exists()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database" * 100)
    result = evaluate(world, tmp_path, capsys, f"mlflow.tracking_uri=sqlite:///{garbage}")
    assert result.outcome.code == 1 and result.run is None and "Traceback" not in result.stderr
    assert result.error_lines == [
        f"error: mlflow.tracking_uri=sqlite:///{garbage}: file is not a database"
    ]
    client = MlflowClient(tracking_uri=world.uri)
    deleted = client.create_experiment("deleted")
    client.delete_experiment(deleted)
    result = evaluate(world, tmp_path, capsys, "mlflow.experiment=deleted")
    assert result.outcome.code == 1 and result.run is None and "Traceback" not in result.stderr
    assert result.error_lines == [
        f"error: mlflow.experiment=deleted: the experiment is deleted in {world.uri} (restore "
        f"it: mlflow experiments restore --experiment-id {deleted}, or choose another "
        "mlflow.experiment)"
    ]


def test_a_corrupt_training_configuration_beside_the_model_names_it(
    world: World, tmp_path: Path, capsys
) -> None:
    """model=file reads patch_config.pkl beside the model (one folder up from model/): a
    truncated one is one line naming it; the configuration never started: no run."""
    run_folder = tmp_path / "training_run"
    (run_folder / "model").mkdir(parents=True)
    model = run_folder / "model" / "best.pt"
    model.write_bytes(world.model.read_bytes())
    config = pickle.dumps({"patch_size": [8, 8, 8], "apply_reorder": True})
    (run_folder / "patch_config.pkl").write_bytes(config[: len(config) // 2])
    result = evaluate(world, tmp_path, capsys, "model=file", f"model.path={model}")
    expected = f"{run_folder / 'patch_config.pkl'}: not a readable pickle (EOFError: the data"
    assert_not_started(result, world, tmp_path.name, expected)


def test_trusting_a_pickle_is_tagged_on_the_run(world: World, tmp_path: Path, capsys) -> None:
    result = evaluate(world, tmp_path, capsys, "model.trust_pickle=true")
    assert result.outcome.code == 0
    assert result.run.data.tags["evalharness.trust_pickle"] == "true"
    assert result.run.data.tags["evalharness.model_loader"] == "trusted_pickle"
    default = evaluate(world, tmp_path, capsys, "mlflow.experiment=untrusted")
    assert default.run.data.tags["evalharness.trust_pickle"] == "false"
    assert default.run.data.tags["evalharness.model_loader"] == "pickled_module"


# ------------------------------------------------------------------------ through the real CLI


def run_cli(cwd: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true", "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "evalharness", *overrides]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def cli_overrides(world: World, tmp_path: Path, experiment: str) -> list[str]:
    root = write_dataset(tmp_path / "data", {"ok": good_case()})
    return [
        *base_overrides(world.uri, world.model, root, experiment),
        f"hydra.run.dir={tmp_path / 'run'}",
    ]


def assert_cli_failed(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    for text in expected:
        assert text in errors[0]


def test_cli_typo_in_a_config_key(world: World, tmp_path: Path) -> None:
    result = run_cli(tmp_path, *cli_overrides(world, tmp_path, "typo"), "patch.sise=[8,8,8]")
    assert result.returncode != 0
    assert "Key 'sise' not in 'PatchConfig'" in result.stderr  # Hydra's own message
    assert "Traceback" not in result.stderr


def test_cli_characters_hydra_cannot_parse_unquoted(world: World, tmp_path: Path) -> None:
    """A data root with ``ü`` (or ``(``) unquoted: one `error:` line saying how to quote it,
    not Hydra's lexer exception; no run (the configuration never started)."""
    overrides = cli_overrides(world, tmp_path, "lexer")
    result = run_cli(tmp_path, *overrides, "data.root=/data/Müller")
    assert_cli_failed(
        result,
        "error: data.root=/data/Müller: Hydra cannot parse this override (unexpected "
        "character 'ü' at column 18); quote the value: 'data.root=\"/data/Müller\"'",
    )
    assert "LexerNoViableAltException" not in result.stderr
    assert MlflowClient(tracking_uri=world.uri).get_experiment_by_name("lexer") is None
    assert "mismatched input '('" in unparsable_override(["-m", "data.root=/data/a(1)"])
    assert unparsable_override(["data.root='/data/a(1)'", "--cfg", "job"]) is None


def test_cli_outputs_folder_under_a_file(world: World, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    overrides = cli_overrides(world, tmp_path, "outputs")
    result = run_cli(tmp_path, *overrides, f"hydra.run.dir={blocker / 'run'}")
    assert_cli_failed(result, f"hydra.run.dir={blocker / 'run'}", f"{blocker} is not a folder")
    assert no_run(world, "outputs")


class Payload:
    """Pickles as a call of `function(*args)`: what a malicious file does."""

    def __init__(self, function: Callable, *args: str) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def test_cli_pickle_payload_is_refused_and_never_runs(world: World, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "best_learner.pkl"
    evil.write_bytes(pickle.dumps(Payload(os.system, f"touch {marker}")))
    overrides = cli_overrides(world, tmp_path, "payload")
    result = run_cli(tmp_path, *overrides, f"model.path={evil}")
    assert_cli_failed(result, str(evil), "refused to unpickle global", "system")
    assert not marker.exists()
    assert no_run(world, "payload")

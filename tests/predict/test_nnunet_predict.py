"""nnU-Net inference in the harness equals nnU-Net's own (`predict.nnunet`).

Logits are compared exactly with ``nnUNetPredictor`` run in the same process on the same
checkpoint; label maps with the fixture's ``nnUNetv2_predict`` outputs (written elsewhere by
nnU-Net 2.8.1 with torch 2.14) at the agreement the issue asks (>= 99.9 % of voxels).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunet_fixture import (
    MODEL,
    TEST_CASES,
    add_perturbed_fold,
    copy_model,
    fixture_case,
    reference_labels,
)

from evalharness.model.nnunet import read_model_folder
from evalharness.model.nnunet_network import build_fold_networks
from evalharness.predict.nnunet import (
    NnunetRunner,
    NnunetSettings,
    to_harness_axes,
    to_nnunet_axes,
)
from evalharness.predict.patch_outputs import ForwardCounts

CPU = torch.device("cpu")
NO_MIRRORING = NnunetSettings(
    step_size=0.5, mirroring=False, use_gaussian=True, keep_largest_component=False
)


def runner_for(folder: Path, folds: list[int]) -> NnunetRunner:
    model = read_model_folder(folder, folds)
    return NnunetRunner(model, build_fold_networks(model))


def nnunet_predictor(folder: Path, folds: tuple[int, ...], step: float, mirroring: bool):
    """nnU-Net's own predictor, initialised from the folder as nnUNetv2_predict does."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(
            tile_step_size=step,
            use_mirroring=mirroring,
            perform_everything_on_device=False,
            device=CPU,
            verbose=False,
            allow_tqdm=False,
        )
        predictor.initialize_from_trained_model_folder(str(folder), use_folds=folds)
    return predictor


@pytest.fixture(scope="module")
def runner() -> NnunetRunner:
    return runner_for(MODEL, [0])


@pytest.fixture(scope="module")
def inputs(runner: NnunetRunner) -> dict:
    return {case_id: runner.load_inputs(fixture_case(case_id)) for case_id in TEST_CASES}


def test_axes_round_trip() -> None:
    transpose = [2, 0, 1]
    values = [10, 20, 30]
    assert to_nnunet_axes(to_harness_axes(values, transpose), transpose) == values
    assert to_harness_axes([1.37, 1.25, 1.0], [0, 1, 2]) == [1.0, 1.25, 1.37]


def test_logits_equal_nnunet_predictor(runner: NnunetRunner, inputs: dict) -> None:
    """Same process, same kernels: the logits of nnU-Net's predictor, bit for bit, and one
    forward pass per tile (2 x 2 x 2 tiles at step 0.5)."""
    predictor = nnunet_predictor(MODEL, (0,), 0.5, False)
    data = inputs["la_005"].prepared.tensor
    expected = predictor.predict_logits_from_preprocessed_data(data)
    counts = ForwardCounts()
    ours = runner.logits(data, NO_MIRRORING, CPU, counts=counts)
    assert torch.equal(ours, expected)
    assert counts.executed == 8


def test_labels_agree_with_nnunetv2_predict(runner, inputs) -> None:
    """Both test cases without mirroring at step 0.5, la_005 at step 0.25 (3 x 3 x 3 tiles);
    the mirrored setting is checked end to end (tests/evaluation/test_nnunet_eval.py)."""
    checks = [("fold0_disable_tta", 0.5, c) for c in TEST_CASES]
    checks.append(("fold0_step0.25_disable_tta", 0.25, "la_005"))
    for setting, step, case_id in checks:
        labels = runner.predict(inputs[case_id], NnunetSettings(step, False, True, False), CPU)
        reference = reference_labels(setting, case_id)
        assert labels.labels.shape == reference.shape
        assert (labels.labels == reference).mean() >= 0.999, (setting, case_id)


def small(inputs: dict) -> torch.Tensor:
    """A part of la_001's preprocessed data [C, 32, 64, 96]: two tiles of the [32, 64, 64]
    patch, enough for the rules below at a fraction of a case's forward passes."""
    return inputs["la_001"].prepared.tensor[:, :32, :64, :96].contiguous()


def test_shared_outputs_give_the_same_prediction(runner, inputs) -> None:
    """A store of patch outputs: a second setting with the same tiles (step 0.75 gives step
    0.5's tiles here) reuses every pass and gets bit-identical logits; mirroring reuses the
    identity passes, runs only the mirrored ones and equals mirroring alone."""
    store = DictStore()
    data = small(inputs)
    first, second, mirrored = ForwardCounts(), ForwardCounts(), ForwardCounts()
    alone = runner.logits(data, NO_MIRRORING, CPU)
    shared = runner.logits(data, NO_MIRRORING, CPU, store, first)
    again = runner.logits(data, NnunetSettings(0.75, False, True, False), CPU, store, second)
    assert torch.equal(alone, shared) and torch.equal(alone, again)
    assert (first.executed, first.reused) == (2, 0)
    assert (second.executed, second.reused) == (0, 2)
    mirror = NnunetSettings(0.5, True, True, False)
    with_store = runner.logits(data, mirror, CPU, store, mirrored)
    assert (mirrored.executed, mirrored.reused) == (14, 2)
    assert torch.equal(with_store, runner.logits(data, mirror, CPU))


class DictStore:
    """An in-memory `OutputStore` (what the sweep cache provides per case)."""

    capacity_bytes = 2**30

    def __init__(self) -> None:
        self.entries: dict = {}

    def get(self, key):
        return self.entries.get(key)

    def put(self, key, outputs) -> None:
        self.entries[key] = outputs


def test_two_folds_average_logits(tmp_path: Path, runner: NnunetRunner, inputs: dict) -> None:
    """A two-fold ensemble: the mean of the folds' logits, as nnU-Net's predictor computes it
    (exactly), which differs from the mean of their probabilities."""
    folder = copy_model(tmp_path)
    add_perturbed_fold(folder)
    ensemble = runner_for(folder, [0, 1])
    single = {fold: runner_for(folder, [fold]) for fold in (0, 1)}
    data = small(inputs)
    counts = ForwardCounts()
    logits = ensemble.logits(data, NO_MIRRORING, CPU, counts=counts)
    assert counts.executed == 4
    expected = nnunet_predictor(folder, (0, 1), 0.5, False).predict_logits_from_preprocessed_data(
        data
    )
    assert torch.equal(logits, expected)
    per_fold = [single[f].logits(data, NO_MIRRORING, CPU).float() for f in (0, 1)]
    mean_logits = (per_fold[0] + per_fold[1]) / 2
    assert torch.allclose(logits.float(), mean_logits, atol=0.25)  # half-precision buffers
    mean_probs = (per_fold[0].softmax(0) + per_fold[1].softmax(0)) / 2
    gap = (logits.float().softmax(0) - mean_probs).abs().max()
    assert gap > 0.05  # probability averaging would give other probabilities


def test_keep_largest_component_per_label(runner: NnunetRunner) -> None:
    segmentation = np.zeros((6, 6, 6), dtype=np.uint8)
    segmentation[0:3, 0:3, 0:3] = 1
    segmentation[5, 5, 5] = 1
    kept = runner.keep_largest(segmentation)
    assert kept.sum() == 27 and kept[5, 5, 5] == 0


def test_image_with_other_channels_than_channel_names(tmp_path: Path, runner) -> None:
    """A channel file holding two channels (4-D) for a one-channel model fails its case."""
    import nibabel as nib

    from evalharness.errors import CaseError

    source = nib.load(str(fixture_case("la_005").image))
    data = np.stack([np.asarray(source.dataobj)] * 2, axis=-1)
    path = tmp_path / "la_005_0000.nii.gz"
    nib.save(nib.Nifti1Image(data, source.affine), str(path))
    case = fixture_case("la_005")
    with pytest.raises(CaseError, match=r"la_005_0000\.nii\.gz: the image has 2 channel\(s\)"):
        runner.load_inputs(type(case)(case.case_id, path, case.label, (path,)))

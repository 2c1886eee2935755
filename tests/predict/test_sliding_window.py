"""inference.py: equivalence with TorchIO's GridSampler + GridAggregator and MONAI's sliding
window, TTA, decoding, and the whole path on the real fastMONAI 0.12 fixture."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio
from conftest import FIXTURE

from evalharness.config.rules import DEFAULT_RESTORE, overlap_to_voxels
from evalharness.config.settings import EffectiveSettings
from evalharness.data.datasets import Case
from evalharness.data.nifti_io import load_label, write_nifti
from evalharness.errors import ConfigError
from evalharness.evaluation.case_loop import LoopOptions, _save_prediction
from evalharness.predict.pipeline import CaseInputs, predict, preprocess_settings
from evalharness.predict.preprocess import PreprocessSettings, prepare_image, restore_to_native
from evalharness.predict.sliding_window import (
    blending_window,
    decode,
    patch_starts,
    resolve_device,
    sliding_window_probs,
)
from evalharness.score.masks import keep_largest_component

CPU = torch.device("cpu")


def conv_model(out_channels: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Conv3d(1, out_channels, 3, padding=1).eval()


def torchio_probs(model, image, patch, overlap_vox, mode, batch_size=3) -> torch.Tensor:
    """Reference: fastMONAI's loop over TorchIO's GridSampler and GridAggregator."""
    sampler = tio.GridSampler(tio.Subject(image=tio.ScalarImage(tensor=image)), patch, overlap_vox)
    aggregator = tio.GridAggregator(sampler, overlap_mode=mode)
    with torch.inference_mode():
        for batch in torch.utils.data.DataLoader(sampler, batch_size=batch_size):
            logits = model(batch["image"][tio.DATA])
            probs = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, 1)
            aggregator.add_batch(probs, batch[tio.LOCATION])
    return aggregator.get_output_tensor()


@pytest.mark.parametrize(
    ("shape", "patch", "overlap"),
    [
        ((37, 29, 21), (16, 16, 12), (8, 8, 6)),
        ((32, 32, 32), (16, 16, 16), (0, 0, 0)),
        ((16, 20, 30), (16, 16, 16), (4, 2, 14)),
        ((96, 96, 43), (48, 48, 32), (24, 24, 16)),
    ],
)
def test_patch_starts_equal_torchio_locations(shape, patch, overlap):
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.zeros(1, *shape)))
    locations = tio.GridSampler(subject, patch, overlap).locations
    assert np.array_equal(patch_starts(shape, patch, overlap), locations[:, :3])


@pytest.mark.parametrize("mode", ["hann", "average", "crop"])
@pytest.mark.parametrize("shape", [(32, 32, 24), (37, 29, 21)])  # second: not a stride multiple
def test_sliding_window_equals_torchio(mode, shape):
    image = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
    model, patch = conv_model(), (16, 16, 12)
    expected = torchio_probs(model, image, patch, overlap_to_voxels(0.5, patch), mode)
    probs = sliding_window_probs(
        model, image, patch_size_vox=patch, overlap=0.5, aggregation=mode, batch_size=3, device=CPU
    )
    assert probs.shape == (2, *shape) and probs.dtype == torch.float32
    assert torch.allclose(probs, expected, atol=1e-5)


def test_single_channel_uses_sigmoid_like_torchio():
    image = torch.randn(1, 30, 26, 20, generator=torch.Generator().manual_seed(2))
    model, patch = conv_model(out_channels=1), (16, 16, 16)
    expected = torchio_probs(model, image, patch, (6, 6, 6), "hann")
    probs = sliding_window_probs(
        model, image, patch_size_vox=patch, overlap=6, aggregation="hann", batch_size=4, device=CPU
    )
    assert torch.allclose(probs, expected, atol=1e-5)


def test_gaussian_equals_monai_where_patch_grids_coincide():
    """MONAI steps int(patch * (1 - overlap)) voxels; with overlap 0.5 and even half-patches
    that is patch - overlap_to_voxels(0.5), so both visit the same patches (last one flush)."""
    from monai.inferers import sliding_window_inference

    image = torch.randn(1, 37, 29, 21, generator=torch.Generator().manual_seed(3))
    model, patch = conv_model(), (16, 16, 12)
    with torch.inference_mode():
        expected = sliding_window_inference(
            image[None],
            patch,
            4,
            lambda x: torch.softmax(model(x), 1),
            overlap=0.5,
            mode="gaussian",
            sigma_scale=0.125,
        )[0]
    probs = sliding_window_probs(
        model, image, patch_size_vox=patch, overlap=0.5, aggregation="gaussian", batch_size=4,
        device=CPU,
    )  # fmt: skip
    assert torch.allclose(probs, expected, atol=1e-5)


def flip_equivariant_model() -> torch.nn.Module:
    """A 3x3x3 convolution whose kernel is symmetric under every mirror flip."""
    model = conv_model()
    with torch.no_grad():
        weight = model.weight
        flips = [[], [2], [3], [4], [2, 3], [2, 4], [3, 4], [2, 3, 4]]
        weight.copy_(sum(weight.flip(f) if f else weight for f in flips) / 8)
    return model


@pytest.mark.parametrize("tta", [True, [[0], [1, 2]]])
def test_tta_with_flip_equivariant_model_changes_nothing(tta):
    image = torch.randn(1, 30, 26, 20, generator=torch.Generator().manual_seed(4))
    model = flip_equivariant_model()
    kwargs = {"patch_size_vox": (16, 16, 12), "overlap": 0.5, "aggregation": "hann"}
    plain = sliding_window_probs(model, image, batch_size=2, device=CPU, **kwargs)
    mirrored = sliding_window_probs(model, image, batch_size=2, device=CPU, tta=tta, **kwargs)
    assert torch.allclose(plain, mirrored, atol=1e-5)


def test_tta_averages_flips_of_a_non_equivariant_model():
    image = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    model, kwargs = conv_model(), {"patch_size_vox": (16, 16, 16), "overlap": 0}
    plain = sliding_window_probs(
        model, image, aggregation="crop", batch_size=1, device=CPU, **kwargs
    )
    flipped_input = sliding_window_probs(
        model, image.flip(1), aggregation="crop", batch_size=1, device=CPU, **kwargs
    )
    averaged = sliding_window_probs(
        model, image, aggregation="crop", batch_size=1, device=CPU, tta=[[0]], **kwargs
    )
    assert torch.allclose(averaged, (plain + flipped_input.flip(1)) / 2, atol=1e-6)


def test_amp_is_ignored_on_cpu():
    image = torch.randn(1, 20, 20, 20, generator=torch.Generator().manual_seed(6))
    kwargs = {"patch_size_vox": (16, 16, 16), "overlap": 0.5, "aggregation": "hann"}
    plain = sliding_window_probs(conv_model(), image, batch_size=4, device=CPU, **kwargs)
    amp = sliding_window_probs(conv_model(), image, batch_size=4, device=CPU, amp=True, **kwargs)
    assert torch.equal(plain, amp)


def test_blending_window_is_cached_and_matches_torchio():
    window = blending_window((16, 12, 8), "hann", "cpu")
    assert window is blending_window([16, 12, 8], "hann", CPU)
    expected = tio.GridAggregator._get_hann_window(np.array([16, 12, 8]))
    assert window.shape == (1, 16, 12, 8) and torch.equal(window[0], expected)
    assert torch.equal(blending_window((4, 4, 4), "average", CPU), torch.ones(1, 4, 4, 4))
    with pytest.raises(ValueError, match="crop"):
        blending_window((4, 4, 4), "crop", CPU)


def test_training_mode_model_is_refused():
    with pytest.raises(ValueError, match="eval"):
        sliding_window_probs(
            conv_model().train(), torch.zeros(1, 8, 8, 8), patch_size_vox=(8, 8, 8), overlap=0,
            aggregation="hann", batch_size=1, device=CPU,
        )  # fmt: skip


def test_decode():
    probs = torch.tensor([[0.2, 0.5, 0.1], [0.3, 0.1, 0.1], [0.5, 0.4, 0.8]])
    assert torch.equal(decode(probs), torch.tensor([2, 0, 2], dtype=torch.uint8))
    binary = torch.tensor([[0.49, 0.5, 0.9]])
    assert torch.equal(decode(binary), torch.tensor([0, 1, 1], dtype=torch.uint8))
    assert torch.equal(decode(binary, threshold=0.95), torch.tensor([0, 0, 0], dtype=torch.uint8))
    many = torch.rand(5, 40, 30, generator=torch.Generator().manual_seed(8))
    many[:, 0, 0] = 0.2  # a tie: the first class wins, as with argmax
    assert torch.equal(decode(many), many.argmax(dim=0).to(torch.uint8))


def test_resolve_device():
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="inference.device"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="inference.device"):
        resolve_device("abacus")


def dsc(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def fastmonai_restore(labels: torch.Tensor, affine: np.ndarray, image_path: Path, axcodes):
    """fastMONAI's way: decoded labels, Resize (nearest) to the reoriented native shape, then
    back to the file's orientation."""
    reoriented_shape = tio.ToCanonical()(tio.ScalarImage(image_path)).shape[1:]
    label = tio.LabelMap(tensor=labels[None].to(torch.uint8), affine=affine)
    label = tio.Resize(reoriented_shape, label_interpolation="nearest")(label)
    return tio.ToOrientation("".join(axcodes))(label).data[0].numpy()


@pytest.fixture(scope="module")
def fixture_model():
    from monai.networks.nets import UNet
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = FIXTURE / "training_run" / "model" / "best_model.safetensors"
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    model = UNet(**json.loads(metadata["arch_kwargs"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval(), json.loads(metadata["inference_config"])["patch_config"]


@pytest.mark.parametrize("case", ["la_001", "la_005"])
def test_fastmonai_fixture_end_to_end(fixture_model, case):
    """The whole path on a real fastMONAI 0.12 model and its held-out cases (fastMONAI's own
    patch_inference scored DSC about 0.98). Restoring probabilities beats restoring labels."""
    model, config = fixture_model
    settings = PreprocessSettings(
        apply_reorder=config["apply_reorder"],
        target_spacing_mm=tuple(config["target_spacing"]),
        normalization=tuple(config["normalization"]),
        padding_mode=config["padding_mode"],
        min_shape_vox=tuple(config["patch_size"]),
    )
    image_path = FIXTURE / "Task02_HeartSynth" / "imagesTr" / f"{case}.nii.gz"
    gt, _ = load_label(FIXTURE / "Task02_HeartSynth" / "labelsTr" / f"{case}.nii.gz")
    prepared = prepare_image(image_path, settings)
    probs = sliding_window_probs(
        model,
        prepared.tensor,
        patch_size_vox=config["patch_size"],
        overlap=config["patch_overlap"],
        aggregation=config["aggregation_mode"],
        batch_size=4,
        device=CPU,
    )
    ours = keep_largest_component(decode(restore_to_native(probs, prepared)).numpy() > 0)
    model_grid = torch.as_tensor(keep_largest_component(decode(probs).numpy() > 0))
    theirs = fastmonai_restore(model_grid, prepared.affine, image_path, prepared.native.axcodes)
    assert ours.shape == gt.shape == theirs.shape
    assert dsc(ours, gt > 0) >= 0.97
    assert dsc(ours, gt > 0) > dsc(theirs > 0, gt > 0)


def test_more_than_255_classes_survive_predict_and_the_saved_prediction(tmp_path):
    """A 300-class model: `predict` and the saved NIfTI keep labels past 255 (no uint8 wrap);
    a 2-class prediction is still saved as uint8."""
    shape = (6, 5, 4)
    truth = np.arange(np.prod(shape)).reshape(shape) * 299 // (np.prod(shape) - 1)  # 0..299
    image_path = tmp_path / "image.nii.gz"
    write_nifti(image_path, truth.astype(np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))
    model = torch.nn.Conv3d(1, 300, 1).eval()  # logit k = k x - k^2 / 2: argmax = round(x)
    with torch.no_grad():
        classes = torch.arange(300, dtype=torch.float32)
        model.weight.copy_(classes.reshape(300, 1, 1, 1, 1))
        model.bias.copy_(-(classes**2) / 2)
    settings = EffectiveSettings(
        apply_reorder=False, target_spacing_mm=None, normalization=(), padding_mode=0,
        patch_size_vox=shape, overlap=0, aggregation="crop", keep_largest_component=True,
        threshold=0.5, batch_size=1, device="cpu", amp=False, tta=False,
    )  # fmt: skip
    prepared = prepare_image(image_path, preprocess_settings(settings))
    prediction = predict(model, prepared, settings, CPU, n_output_channels=300)
    assert prediction.n_channels == 300
    np.testing.assert_array_equal(prediction.labels, truth)

    case = Case(case_id="many", image=image_path, label=None)
    inputs = CaseInputs(case=case, prepared=prepared, gt_labels=None, gt_affine=None)
    saved: list[Path] = []
    sink = SimpleNamespace(prediction_saved=saved.append)
    options = LoopOptions(predictions_dir=tmp_path / "predictions")
    _save_prediction(options, sink, case, inputs, prediction.labels)
    _save_prediction(options, sink, replace(case, case_id="two"), inputs, truth % 2)
    many, two = (nib.load(path) for path in saved)
    np.testing.assert_array_equal(np.asarray(many.dataobj), truth)
    np.testing.assert_array_equal(np.asarray(two.dataobj), truth % 2)
    assert many.get_data_dtype() == np.uint16 and two.get_data_dtype() == np.uint8


@pytest.mark.parametrize("target_spacing_mm", [None, (1.0, 1.0, 1.0)])
def test_predict_can_keep_the_native_probabilities(tmp_path, target_spacing_mm):
    """`keep_probabilities` (calibration) returns [K, X, Y, Z] native-grid probabilities,
    restored linearly: with ``inference.restore=probabilities`` their decoding is the returned
    labels; with any method the labels are those `predict` gives without them."""
    rng = np.random.default_rng(0)
    image_path = tmp_path / "image.nii.gz"
    affine = np.diag([-1.5, 1.0, 2.0, 1.0])  # not RAS, anisotropic: restoring really resamples
    write_nifti(image_path, rng.normal(size=(7, 6, 5)).astype(np.float32), affine)
    model = torch.nn.Conv3d(1, 3, 1).eval()
    settings = EffectiveSettings(
        apply_reorder=True, target_spacing_mm=target_spacing_mm, normalization=(),
        padding_mode=0, patch_size_vox=(8, 8, 8), overlap=0, aggregation="crop",
        keep_largest_component=False, threshold=0.5, batch_size=1, device="cpu", amp=False,
        tta=False, restore="probabilities",
    )  # fmt: skip
    prepared = prepare_image(image_path, preprocess_settings(settings))
    plain = predict(model, prepared, settings, CPU, n_output_channels=3)
    kept = predict(model, prepared, settings, CPU, n_output_channels=3, keep_probabilities=True)
    assert plain.probabilities is None
    assert kept.probabilities.shape == (3, 7, 6, 5) and kept.probabilities.dtype == np.float32
    np.testing.assert_allclose(kept.probabilities.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(kept.labels, decode(torch.from_numpy(kept.probabilities)))
    np.testing.assert_array_equal(kept.labels, plain.labels)
    default = dataclasses.replace(settings, restore=DEFAULT_RESTORE)
    labels = predict(model, prepared, default, CPU, n_output_channels=3, keep_probabilities=True)
    np.testing.assert_array_equal(
        labels.labels, predict(model, prepared, default, CPU, n_output_channels=3).labels
    )

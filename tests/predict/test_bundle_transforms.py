"""A bundle's preprocessing applied by MONAI, the settings acting on it, the padding and
Invertd's restoration (`predict.bundle_transforms`); logits blended then activated, as MONAI's
sliding-window inferer does (`predict.sliding_window`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bundles import write_bundle
from monai.inferers import sliding_window_inference
from tiny import AFFINE, SHAPE, ball

from evalharness.data.nifti_io import write_nifti
from evalharness.errors import ConfigError
from evalharness.model.bundle import BundleNetwork, read_bundle
from evalharness.model.bundle_contract import bundle_contract
from evalharness.predict.bundle_transforms import effective_transforms, prepare_bundle_image
from evalharness.predict.preprocess import PreprocessSettings
from evalharness.predict.sliding_window import sliding_window_probs

OWN_NORMALIZATION = (
    {"name": "ScaleIntensityRanged", "a_min": 0, "a_max": 1, "b_min": 0, "b_max": 1, "clip": True},
)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = write_bundle(tmp_path_factory.mktemp("bundle") / "b")
    return bundle_contract(read_bundle(root)).pipeline


def settings(**changes) -> PreprocessSettings:
    values = dict(
        apply_reorder=True,
        target_spacing_mm=(1.5, 1.0, 2.0),
        normalization=OWN_NORMALIZATION,
        padding_mode=0,
        min_shape_vox=(16, 16, 16),
    )
    return PreprocessSettings(**{**values, **changes})


def names(transforms) -> list[str]:
    return [t["_target_"] for t in transforms]


def test_the_bundle_settings_leave_its_transforms_as_they_are(pipeline) -> None:
    assert effective_transforms(pipeline, settings()) == pipeline.preprocessing


def test_settings_act_on_the_bundle_transforms(pipeline) -> None:
    no_reorder = effective_transforms(pipeline, settings(apply_reorder=False))
    assert "Orientationd" not in names(no_reorder)
    coarse = effective_transforms(pipeline, settings(target_spacing_mm=(3.0, 3.0, 3.0)))
    assert [t["pixdim"] for t in coarse if t["_target_"] == "Spacingd"] == [[3.0, 3.0, 3.0]]
    native = effective_transforms(pipeline, settings(target_spacing_mm=None))
    assert "Spacingd" not in names(native)
    other = ({"name": "NormalizeIntensityd", "nonzero": True},)
    normalised = effective_transforms(pipeline, settings(normalization=other))
    assert names(normalised) == [
        "LoadImaged",
        "EnsureChannelFirstd",
        "Orientationd",
        "Spacingd",
        "NormalizeIntensityd",
        "EnsureTyped",
    ]
    assert normalised[4] == {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True}
    with pytest.raises(ConfigError, match="'ZNormalization' is not a MONAI transform"):
        effective_transforms(pipeline, settings(normalization=({"name": "ZNormalization"},)))


def test_prepared_by_monai_padded_as_its_inferer_and_inverted(pipeline, tmp_path: Path) -> None:
    """LPS image of 12 x 10 x 8 voxels: reoriented to RAS, padded to 16^3 with the odd voxel
    after; the inverse of the one-hot label (Invertd) is the label on the native grid."""
    label = ball()
    path = tmp_path / "case.nii.gz"
    write_nifti(path, label.astype(np.float32), AFFINE)
    prepared = prepare_bundle_image(path, settings(), pipeline)
    assert tuple(prepared.tensor.shape) == (1, 16, 16, 16)
    assert prepared.native.shape_vox == SHAPE
    np.testing.assert_allclose(prepared.native.affine, AFFINE, atol=1e-5)
    before = (2, 3, 4)  # (16 - 12) // 2, (16 - 10) // 2, (16 - 8) // 2
    core = prepared.tensor[0, 2:14, 3:13, 4:12]
    assert torch.equal(core, torch.from_numpy(label[::-1, ::-1, :].astype(np.float32).copy()))
    assert float(prepared.tensor.sum()) == float(label.sum())  # zeros around it
    origin = prepared.affine @ np.array([*before, 1.0])
    core_origin = AFFINE @ np.array([SHAPE[0] - 1, SHAPE[1] - 1, 0, 1.0])
    np.testing.assert_allclose(origin, core_origin, atol=1e-5)
    one_hot = torch.stack([1 - prepared.tensor[0], prepared.tensor[0]])
    restored = prepared.inverse(one_hot)
    assert restored.shape == (2, *SHAPE)
    assert torch.equal(restored.argmax(0), torch.from_numpy(label).long())


def test_a_file_monai_cannot_read_is_a_case_error(pipeline, tmp_path: Path) -> None:
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"not a nifti file")
    with pytest.raises(Exception, match=rf"{path}: the bundle's preprocessing failed"):
        prepare_bundle_image(path, settings(), pipeline)


def harness(network: torch.nn.Module, image: torch.Tensor, mode: str) -> torch.Tensor:
    aggregation = "average" if mode == "constant" else "gaussian"
    return sliding_window_probs(
        network,
        image,
        patch_size_vox=(8, 8, 8),
        overlap=0.5,
        aggregation=aggregation,
        batch_size=3,
        device=torch.device("cpu"),
    )


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_logits_blended_then_activated_as_monai_infers(mode: str, n_classes: int) -> None:
    """The harness's window (average = constant, gaussian) on a bundle network equals MONAI's
    `sliding_window_inference` followed by a softmax, to float32 rounding (other kernels);
    blending each patch's probabilities instead (any other model) does not."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, n_classes, 3, padding=1), torch.nn.Tanh())
    network.eval()
    image = torch.rand(1, 20, 18, 16)
    with torch.no_grad():
        logits = sliding_window_inference(image[None], (8, 8, 8), 3, network, 0.5, mode=mode)
    expected = torch.softmax(logits[0], 0)
    ours = harness(BundleNetwork(network, 1).eval(), image, mode)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    assert (harness(network, image, mode) - expected).abs().max() > 1e-4

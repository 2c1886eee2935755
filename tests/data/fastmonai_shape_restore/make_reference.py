"""Write `reference.npz`: fastMONAI 0.12's own shape-based restoring of labels, to test
`inference.restore=labels` against (tests/test_restore.py).

Run with fastMONAI installed (not a dependency of the harness), from the repository root:

    python -m venv /tmp/fm16 && /tmp/fm16/bin/pip install torch==2.13.0 \
        && /tmp/fm16/bin/pip install "fastMONAI==0.12.*"
    /tmp/fm16/bin/python tests/data/fastmonai_shape_restore/make_reference.py

Per case: a native image (LPS or PIR, anisotropic) is written to NIfTI and read by fastMONAI's
`med_img_reader(apply_reorder=True, target_spacing=1 mm)`, which gives the model grid; a label
map of two nested thin shells (2 and 3 mm thick) and a thin tube is drawn on that grid; then
the labels go back exactly as fastMONAI's `PatchInferenceEngine._postprocess` takes them
(`_resize_labels(..., org_size, 'shape')`, then `ToOrientation` to the file's orientation).
Case `exact`: the native field of view is a whole number of model voxels, so fastMONAI's
`Resize` lands on the native grid itself; case `rounded`: it is not, so `Resize` lands on a
grid up to a fraction of a voxel off the native one.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torchio as tio
from fastMONAI.vision_core import med_img_reader
from fastMONAI.vision_inference import _resize_labels

OUT = Path(__file__).with_name("reference.npz")
MODEL_SPACING_MM = 1.0
CASES = {  # name: (axcodes' affine columns, native shape, native spacing mm)
    "exact": ("LPS", (50, 50, 20), (0.8, 0.8, 2.0)),
    "rounded": ("PIR", (47, 30, 53), (0.85, 1.7, 0.75)),
}
DIRECTIONS = {
    "LPS": np.diag([-1.0, -1.0, 1.0]),
    "PIR": np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),
}


def native_affine(axcodes: str, spacing_mm: tuple[float, ...]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = DIRECTIONS[axcodes] * np.asarray(spacing_mm)[None, :]
    affine[:3, 3] = (-7.3, 12.1, 4.4)
    return affine


def model_labels(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Two nested shells (label 1 outer, 2 inner) and a tube (label 1) in world mm."""
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), -1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    centre = world.reshape(-1, 3).mean(0)
    radius = np.linalg.norm(world - centre, axis=-1)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[(radius >= 13.0) & (radius < 15.0)] = 1
    labels[(radius >= 10.0) & (radius < 13.0)] = 2
    offset = world - centre
    tube = np.hypot(offset[..., 0] - 3.0, offset[..., 2] + 2.0) < 1.2
    labels[tube & (radius < 9.0)] = 1
    return labels


def main() -> None:
    arrays: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (axcodes, shape, spacing) in CASES.items():
            affine = native_affine(axcodes, spacing)
            path = Path(folder) / f"{name}.nii.gz"
            rng = np.random.default_rng(0)
            nib.save(nib.Nifti1Image(rng.random(shape).astype(np.float32), affine), path)
            org_img, input_img, org_size = med_img_reader(
                str(path), apply_reorder=True, target_spacing=[MODEL_SPACING_MM] * 3,
                only_tensor=False,
            )  # fmt: skip
            labels = model_labels(input_img.affine, input_img.spatial_shape)
            pred = tio.LabelMap(
                tensor=torch.from_numpy(labels)[None].float(), affine=input_img.affine
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # Resize's CropOrPad notice
                restored = _resize_labels(pred, org_size, "shape")
            restored = tio.ToOrientation("".join(org_img.orientation))(restored)
            assert np.allclose(restored.affine, affine, atol=1e-4) or name == "rounded"
            arrays[f"{name}_native_affine"] = affine
            arrays[f"{name}_model_affine"] = np.asarray(input_img.affine)
            arrays[f"{name}_model_labels"] = labels
            arrays[f"{name}_fastmonai_labels"] = restored.data[0].numpy().astype(np.uint8)
            arrays[f"{name}_fastmonai_affine"] = np.asarray(restored.affine)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

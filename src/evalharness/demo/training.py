"""Training of the demo model, independent of the harness's own preprocessing code.

Cases are preprocessed with TorchIO ``ToCanonical`` + ``Resample(target_spacing)`` +
``ZNormalization`` (`preprocess_case`), sampled as label-weighted random patches written here,
and fed to a MONAI 3D U-Net (`build_model`) trained with DiceCE and Adam (`train_model`), so
evaluating the demo run honestly tests the harness.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from evalharness.demo.spec import DemoSpec

LABEL_PROBABILITIES = {0: 0.3, 1: 0.7}
"""Share of patches centred on background (0) and foreground (1) voxels."""


def preprocess_case(
    image_path: Path, label_path: Path | None, target_spacing_mm: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Load one case as the demo model was trained: RAS+, `target_spacing_mm`, z-normalised.

    Returns image [1, X, Y, Z] float32 and label [1, X, Y, Z] int64 (None without a label).
    """
    import torchio as tio

    images: dict[str, Any] = {"image": tio.ScalarImage(image_path)}
    if label_path is not None:
        images["label"] = tio.LabelMap(label_path)
    transform = tio.Compose(
        [tio.ToCanonical(), tio.Resample(tuple(target_spacing_mm)), tio.ZNormalization()]
    )
    subject = transform(tio.Subject(**images))
    image = subject["image"].data.float()
    label = subject["label"].data.long() if label_path is not None else None
    return image, label


def _pad_to(tensor: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Pad [C, X, Y, Z] with zeros at the end of each axis up to `size` voxels."""
    pad: list[int] = []
    for axis in reversed(range(3)):
        pad += [0, max(int(size[axis]) - tensor.shape[axis + 1], 0)]
    return torch.nn.functional.pad(tensor, pad) if any(pad) else tensor


class _PatchSampler:
    """Random patches centred on a voxel of class c, c drawn with `LABEL_PROBABILITIES`.

    Like TorchIO's LabelSampler: centres are restricted to where the whole patch fits.
    """

    def __init__(self, image: torch.Tensor, label: torch.Tensor, patch_size: Sequence[int]):
        self.image = _pad_to(image, patch_size)
        self.label = _pad_to(label, patch_size)
        self.patch_size = np.asarray(patch_size)
        shape = np.asarray(self.label.shape[1:])
        # valid patch origins: 0 .. shape - patch_size; origin = centre - patch_size // 2
        lo = self.patch_size // 2
        hi = shape - self.patch_size + lo
        region = self.label[0, lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1]
        self.origins_by_class = {c: np.argwhere((region == c).numpy()) for c in LABEL_PROBABILITIES}
        self.n_origins = hi - lo + 1

    def sample(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        classes = list(LABEL_PROBABILITIES)
        c = classes[rng.choice(len(classes), p=list(LABEL_PROBABILITIES.values()))]
        candidates = self.origins_by_class[c]
        if len(candidates):
            origin = candidates[rng.integers(len(candidates))]
        else:
            origin = rng.integers(0, self.n_origins)
        window = tuple(
            slice(int(o), int(o) + int(p)) for o, p in zip(origin, self.patch_size, strict=True)
        )
        return self.image[(slice(None), *window)], self.label[(slice(None), *window)]


def build_model(spec: DemoSpec) -> torch.nn.Module:
    """The demo network: a MONAI 3D U-Net, one input channel, two output classes."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=spec.channels,
        strides=spec.strides,
        num_res_units=1,
    )


def train_model(
    image_paths: Sequence[Path], label_paths: Sequence[Path], spec: DemoSpec
) -> tuple[dict[str, list[float]], torch.nn.Module]:
    """Train the demo U-Net; returns per-epoch history and the model (CPU, eval mode)."""
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    samplers = []
    for image_path, label_path in zip(image_paths, label_paths, strict=True):
        image, label = preprocess_case(image_path, label_path, spec.target_spacing_mm)
        assert label is not None
        samplers.append(_PatchSampler(image, label, spec.patch_size))

    model = build_model(spec)
    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.learning_rate)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.epochs)
    history: dict[str, list[float]] = {"train_loss": [], "train_dsc": []}
    model.train()
    bar = tqdm(range(spec.epochs), desc="demo training", unit="epoch", file=sys.stderr)
    for _epoch in bar:
        order = rng.permutation(np.repeat(np.arange(len(samplers)), spec.samples_per_volume))
        losses, intersection, total = [], 0.0, 0.0
        for start in range(0, len(order), spec.batch_size):
            pairs = [samplers[i].sample(rng) for i in order[start : start + spec.batch_size]]
            images = torch.stack([p[0] for p in pairs])
            labels = torch.stack([p[1] for p in pairs])
            optimizer.zero_grad()
            logits = model(images)
            loss = loss_fn(logits, labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            with torch.no_grad():
                pred = logits.argmax(1) == 1
                truth = labels[:, 0] == 1
                intersection += float((pred & truth).sum())
                total += float(pred.sum() + truth.sum())
        scheduler.step()
        history["train_loss"].append(float(np.mean(losses)))
        history["train_dsc"].append(2 * intersection / total if total else 1.0)
        bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}")
    bar.close()
    return history, model.eval()

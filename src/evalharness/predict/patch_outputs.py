"""Per-patch model outputs kept for reuse, and the counters of forward passes.

A sweep's settings that differ only after the forward passes (aggregation, keep-largest,
threshold, metric options) run the same patches through the same model. The sliding window
hands the activated outputs of each patch batch to an `OutputStore` bound to one case and one
forward key (model, preprocessing, patch size, overlap, batch size, device, precision), one
entry per mirror flip, and a later setting re-blends them instead of running the model. The
identity flip of a TTA setting is the forward pass of the setting without TTA.

The values are exactly what the model path computes (the same tensors, summed in the same
order), so a setting gets bit-identical probabilities whether its outputs were computed or
reused. Entries live on the CPU; the store decides how many bytes it may hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from evalharness.config.settings import EffectiveSettings, stable_hash

Flip = tuple[int, ...]
"""Spatial axes (0, 1, 2 of [X, Y, Z]) mirrored before the forward pass; () is the identity."""


@dataclass(frozen=True)
class PatchOutputs:
    """The activated outputs of every patch of one case under one flip.

    `batches[i]` is float32 [B_i, K', x, y, z] on the CPU, flipped back (K' = 1 for two classes:
    class 1's probability); `n_classes` is the model's output channel count; `forward_s` the
    measured seconds the forward passes that produced them took.
    """

    n_classes: int
    batches: tuple[torch.Tensor, ...]
    forward_s: float

    @property
    def n_patches(self) -> int:
        return sum(int(b.shape[0]) for b in self.batches)

    @property
    def nbytes(self) -> int:
        return sum(b.element_size() * b.nelement() for b in self.batches)


class OutputStore(Protocol):
    """Where the sliding window finds and leaves the patch outputs of one case."""

    capacity_bytes: int  # entries larger than this are not collected at all

    def get(self, flip: Flip) -> PatchOutputs | None: ...

    def put(self, flip: Flip, outputs: PatchOutputs) -> None: ...


@dataclass
class ForwardCounts:
    """Patch forward passes of a case or a run: executed, reused, and the measured seconds the
    reused ones took when they were executed (what the setting would have paid alone)."""

    executed: int = 0
    reused: int = 0
    reused_forward_s: float = 0.0

    def add(self, other: ForwardCounts) -> None:
        self.executed += other.executed
        self.reused += other.reused
        self.reused_forward_s += other.reused_forward_s

    def as_metrics(self) -> dict[str, float]:
        return {"forward_passes": float(self.executed), "forward_passes_reused": float(self.reused)}


def forward_key(model_key: str, settings: EffectiveSettings, device: torch.device) -> str:
    """What decides a case's per-patch model outputs besides the case and its preprocessing
    (patch size is in the case key too): the model (`model_key`: checksum and loading options),
    the patch grid, the batch size (a patch's output may depend on its batch at float
    precision: not assumed otherwise), the device and the precision. Aggregation, flips,
    keep-largest and threshold are not in it: they are what the settings sharing it vary."""
    return stable_hash(
        {
            "model": model_key,
            "patch_size_vox": list(settings.patch_size_vox),
            "overlap_vox": list(settings.overlap_vox),
            "batch_size": settings.batch_size,
            "device": str(device),
            "amp": bool(settings.amp and device.type == "cuda"),
        }
    )

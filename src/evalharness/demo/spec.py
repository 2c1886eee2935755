"""The demo's sizes: dataset, preprocessing grid, network and training length (`DEMO`, `TINY`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DemoSpec:
    """Sizes of the demo: dataset, preprocessing grid, network and training length.

    `patch_size` (voxels on the `target_spacing_mm` grid) must be divisible by
    ``2 ** (len(channels) - 1)`` (the U-Net downsamples by 2 between levels).
    """

    n_cases: int
    n_test: int
    field_of_view_mm: tuple[float, float, float]
    target_spacing_mm: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    channels: tuple[int, ...]
    epochs: int
    seed: int = 0
    samples_per_volume: int = 8
    batch_size: int = 4
    learning_rate: float = 3e-3

    def __post_init__(self) -> None:
        if not 1 <= self.n_test < self.n_cases:
            raise ValueError(f"need 1 <= n_test < n_cases, got {self.n_test}, {self.n_cases}")
        if len(self.channels) < 2:
            raise ValueError(f"need at least two U-Net levels, got channels={self.channels}")
        factor = 2 ** (len(self.channels) - 1)
        if any(p % factor for p in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size} must be divisible by {factor}")
        if min(self.epochs, self.samples_per_volume, self.batch_size) < 1:
            raise ValueError("epochs, samples_per_volume and batch_size must be positive")

    @property
    def strides(self) -> tuple[int, ...]:
        return (2,) * (len(self.channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    def key(self) -> str:
        """Short stable hash of the spec: names its cache folder."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


DEMO = DemoSpec(
    n_cases=12,
    n_test=3,
    field_of_view_mm=(120.0, 120.0, 60.0),
    target_spacing_mm=(1.5, 1.5, 1.5),
    patch_size=(32, 32, 32),
    channels=(8, 16, 32, 64),
    epochs=25,
)
"""The real demo: about a minute on 2 CPU cores (450 Adam steps on 4 patches of 32^3)."""

TINY = DemoSpec(
    n_cases=4,
    n_test=1,
    field_of_view_mm=(48.0, 48.0, 24.0),
    target_spacing_mm=(1.5, 1.5, 1.5),
    patch_size=(16, 16, 16),
    channels=(4, 8),
    epochs=2,
    samples_per_volume=2,
)
"""For tests: builds in seconds; model quality irrelevant."""

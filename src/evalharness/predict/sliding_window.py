"""Sliding-window prediction of one preprocessed volume, as fastMONAI's patch inference does it.

Patch locations and the 'crop', 'average' and 'hann' blending reproduce TorchIO's GridSampler +
GridAggregator (what fastMONAI uses); 'gaussian' uses MONAI's importance map. Unlike TorchIO,
everything stays on the model's device: patches are sliced from the device copy of the volume,
probabilities are accumulated there with in-place slice adds, the window is built once (a
volume over the device's memory budget keeps its buffers on the CPU instead: `memory.py`).
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch

from evalharness.config.rules import overlap_to_voxels
from evalharness.errors import ConfigError
from evalharness.predict.ensemble import members_of
from evalharness.predict.patch_outputs import ForwardCounts, OutputStore, PatchOutputs

NORMALIZE_SLAB_VOXELS = 1 << 20  # voxels of the summed blending weights built at a time
# The 8 mirror flips of [X, Y, Z] as sets of spatial axes, identity first.
ALL_FLIPS = tuple(axes for n in range(4) for axes in itertools.combinations((0, 1, 2), n))


def patch_starts(
    shape_vox: Sequence[int], patch_size_vox: Sequence[int], overlap_vox: Sequence[int]
) -> np.ndarray:
    """[N, 3] first voxel of every patch, in the order of TorchIO's GridSampler locations.

    Per axis: 0, step, 2 step, ... (step = patch - overlap) plus a last patch flush with the end.
    """
    per_axis = []
    for size, patch, overlap in zip(shape_vox, patch_size_vox, overlap_vox, strict=True):
        if patch > size:
            raise ValueError(f"patch {tuple(patch_size_vox)} larger than volume {tuple(shape_vox)}")
        starts = list(range(0, size - patch + 1, patch - overlap))
        if starts[-1] != size - patch:
            starts.append(size - patch)
        per_axis.append(starts)
    grid = np.meshgrid(*per_axis, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1).astype(np.int64)


def _window_factors(
    patch_size_vox: tuple[int, int, int], aggregation: str
) -> list[torch.Tensor] | None:
    """The three 1-D windows whose outer product is the blending window; None for MONAI's
    gaussian, whose clamped tails make it not separable."""
    if aggregation == "hann":  # TorchIO GridAggregator._get_hann_window
        return [torch.hann_window(size + 2, periodic=False)[1:-1] for size in patch_size_vox]
    if aggregation == "average":
        return [torch.ones(size) for size in patch_size_vox]
    return None


@functools.lru_cache(maxsize=16)
def _window(patch_size_vox: tuple[int, int, int], aggregation: str, device: torch.device):
    if aggregation not in ("hann", "average", "gaussian"):
        raise ValueError(f"no blending window for aggregation {aggregation!r}")
    factors = _window_factors(patch_size_vox, aggregation)
    if factors is None:  # gaussian
        from monai.data.utils import compute_importance_map

        window = compute_importance_map(patch_size_vox, mode="gaussian", sigma_scale=0.125)
    else:  # built on the CPU, multiplied in TorchIO's order
        window = torch.ones(patch_size_vox)
        for axis, factor in enumerate(factors):
            shape = [1, 1, 1]
            shape[axis] = -1
            window = window * factor.view(shape)
    return window.to(device=device, dtype=torch.float32)[None]


def blending_window(
    patch_size_vox: Sequence[int], aggregation: str, device: torch.device | str
) -> torch.Tensor:
    """[1, X, Y, Z] float32 patch weights, cached per (size, mode, device); do not modify it.

    'hann' and 'average' as TorchIO's GridAggregator, 'gaussian' as MONAI's
    `compute_importance_map(sigma_scale=0.125)`. 'crop' has no window (it crops instead).
    """
    size = tuple(int(s) for s in patch_size_vox)
    return _window(size, aggregation, torch.device(device))


def _flip_sets(tta: bool | Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Spatial-axis sets to average over; the identity always comes first."""
    if tta is True:
        return list(ALL_FLIPS)
    if tta is False:
        return [()]
    sets = [tuple(sorted({int(a) for a in axes})) for axes in tta]
    return [()] + [axes for axes in dict.fromkeys(sets) if axes]


def _flip_probs(
    model: torch.nn.Module, batch: torch.Tensor, axes: tuple[int, ...], autocast
) -> tuple[torch.Tensor, int]:
    """(float32 probabilities [B, K', x, y, z] of the batch mirrored along `axes`, flipped back,
    averaged over the members of an `Ensemble`; K). Softmax, or sigmoid for 1 channel. Of K = 2
    classes only class 1's comes back (K' = 1): sigmoid(l1 - l0), which is its softmax; class
    0's is 1 minus it, so blending one channel instead of two suffices. Members run one after
    another: one member's activations are on the device at a time. A fresh tensor that nothing
    modifies afterwards (it may be kept)."""
    dims = [a + 2 for a in axes]
    flipped = batch.flip(dims) if dims else batch
    members = members_of(model)
    total = None
    for member in members:
        with autocast:
            logits = member(flipped)
        logits = logits.float()
        n_classes = logits.shape[1]
        if blends_logits(member):  # activated after blending (`activate_blended`)
            probs = torch.sub(logits[:, 1:], logits[:, :1]) if n_classes == 2 else logits
        elif n_classes == 2:
            probs = torch.sub(logits[:, 1:], logits[:, :1]).sigmoid_()
        else:
            probs = torch.sigmoid(logits) if n_classes == 1 else torch.softmax(logits, dim=1)
        del logits
        total = probs if total is None else total.add_(probs)
    if len(members) > 1:
        total = total.div_(len(members))
    return (total.flip(dims) if dims else total), n_classes


def blends_logits(model: torch.nn.Module) -> bool:
    """Whether `model` (a bundle's network, `model.bundle.BundleNetwork`) has its logits
    blended across patches and activated afterwards, as MONAI's sliding-window inferer
    followed by an activation does; other models' patches are activated first, as
    fastMONAI's and TorchIO's patch inference do."""
    return all(getattr(member, "blends_logits", False) for member in members_of(model))


def activate_blended(blended: torch.Tensor) -> torch.Tensor:
    """In place: blended logits [K', ...] -> probabilities. K' = 1 holds l1 - l0 of a
    two-class model (sigmoid of it is its softmax of class 1) or a one-channel model's logit
    (sigmoid); more channels take a softmax."""
    if blended.shape[0] == 1:
        return blended.sigmoid_()
    blended.copy_(torch.softmax(blended, dim=0))
    return blended


class _Forwards:
    """The flip outputs of each patch batch: from the store where it holds them, else from the
    model, counted (`ForwardCounts`) and collected for the store while they fit its capacity."""

    def __init__(
        self,
        flips: list[tuple[int, ...]],
        n_batches: int,
        outputs: OutputStore | None,
        counts: ForwardCounts | None,
        device: torch.device,
    ) -> None:
        self.flips, self.outputs, self.device = flips, outputs, device
        self.counts = counts if counts is not None else ForwardCounts()
        self.stored: dict[tuple[int, ...], PatchOutputs] = {}
        if outputs is not None:
            for axes in flips:
                entry = outputs.get(axes)
                if entry is not None and len(entry.batches) == n_batches:
                    self.stored[axes] = entry
        collect = outputs is not None and len(self.stored) < len(flips)
        self.fresh = {a: [] for a in flips if a not in self.stored} if collect else None
        self.seconds = dict.fromkeys(flips, 0.0)
        self.collected_bytes = 0
        self.n_classes = next((e.n_classes for e in self.stored.values()), None)

    def probs(
        self, index: int, model: torch.nn.Module, make_batch: Callable[[], torch.Tensor], autocast
    ) -> torch.Tensor:
        """Flip-averaged probabilities [B, K', x, y, z] of batch `index`, summed in flip order."""
        total, batch = None, None
        for position, axes in enumerate(self.flips):
            entry = self.stored.get(axes)
            if entry is not None:
                probs = entry.batches[index].to(self.device)
                self.counts.reused += int(probs.shape[0])
            else:
                batch = make_batch() if batch is None else batch
                started = time.perf_counter()
                probs, self.n_classes = _flip_probs(model, batch, axes, autocast)
                self._collect(axes, probs)
                self.seconds[axes] += time.perf_counter() - started
                self.counts.executed += int(probs.shape[0]) * len(members_of(model))
            if position == 0:
                total = probs  # may be a kept tensor: never modified in place
            elif position == 1:
                total = total + probs  # a new tensor, what `add_` on the first would give
            else:
                total.add_(probs)
        return total if len(self.flips) == 1 else total.div_(len(self.flips))

    def _collect(self, axes: tuple[int, ...], probs: torch.Tensor) -> None:
        if self.fresh is None:
            return
        kept = probs.to("cpu")  # the same tensor on a CPU device: never modified (see above)
        self.collected_bytes += kept.element_size() * kept.nelement()
        if self.collected_bytes > self.outputs.capacity_bytes:
            self.fresh = None  # this case's patches do not fit: recomputed by the next setting
            return
        self.fresh[axes].append(kept)

    def finish(self) -> None:
        """Hand the collected entries to the store; count the reused ones' measured seconds."""
        for entry in self.stored.values():
            self.counts.reused_forward_s += entry.forward_s
        if self.fresh is None or self.outputs is None:
            return
        for axes, batches in self.fresh.items():
            outputs = PatchOutputs(int(self.n_classes), tuple(batches), self.seconds[axes])
            self.outputs.put(axes, outputs)


def _region(lo: np.ndarray, hi: np.ndarray) -> tuple[slice, ...]:
    """Index of [C, lo:hi] in a [C, X, Y, Z] tensor."""
    return (slice(None), *(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True)))


def _divide_by_window_sum(
    out: torch.Tensor,
    starts: np.ndarray,
    shape: np.ndarray,
    patch: np.ndarray,
    aggregation: str,
    window: torch.Tensor,
) -> None:
    """Divide `out` [K, X, Y, Z] in place by the sum of the blending windows of all patches.

    A separable window over a grid of starts sums axis by axis: the sum is the outer product of
    three 1-D sums, built slab by slab along X (no weight volume); others sum patch by patch.
    """
    factors = _window_factors(tuple(int(p) for p in patch), aggregation)
    if factors is None:
        weights = torch.zeros((1, *shape), dtype=torch.float32, device=window.device)
        for start in starts:
            weights[_region(start, start + patch)].add_(window)
        out.div_(weights)
        return
    sums = []
    for axis, factor in enumerate(factors):
        total = torch.zeros(int(shape[axis]))
        for start in np.unique(starts[:, axis]):
            total[start : start + len(factor)] += factor
        sums.append(total.to(window.device))
    slab = max(1, NORMALIZE_SLAB_VOXELS // int(shape[1] * shape[2]))
    for x0 in range(0, int(shape[0]), slab):
        x = slice(x0, x0 + slab)
        out[:, x].div_(sums[0][x, None, None] * sums[1][None, :, None] * sums[2][None, None, :])


def _crop_regions(
    start: np.ndarray, patch: np.ndarray, shape: np.ndarray, half_overlap: np.ndarray
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """('crop' mode) where in the volume and which part of the patch: half the overlap is cut
    off every side that is not at the volume border (TorchIO GridAggregator._crop_patch)."""
    lo = np.where(start > 0, half_overlap, 0)
    hi = patch - np.where(start + patch != shape, half_overlap, 0)
    return _region(start + lo, start + hi), _region(lo, hi)


@torch.inference_mode()
def sliding_window_probs(
    model: torch.nn.Module,
    image: torch.Tensor,
    *,
    patch_size_vox: Sequence[int],
    overlap: float | int | Sequence[int],
    aggregation: str,
    batch_size: int,
    device: torch.device,
    amp: bool = False,
    tta: bool | Sequence[Sequence[int]] = False,
    buffer_device: torch.device | str | None = None,
    outputs: OutputStore | None = None,
    counts: ForwardCounts | None = None,
) -> torch.Tensor:
    """image [C, X, Y, Z] → class probabilities [K, X, Y, Z] float32 on `buffer_device`.

    The model (an `Ensemble`: its members' probabilities averaged per patch) must be in eval
    mode and on `device`; the volume must be at least one patch in
    every axis (`PreprocessSettings.min_shape_vox` pads it). Patches are batched, activated per
    patch (softmax, or sigmoid for one channel) and blended on the device: 'hann', 'average' and
    'gaussian' weight every patch by `blending_window` and divide by the summed weights; 'crop'
    writes each patch less half the overlap on interior sides, later patches winning, as
    TorchIO does. bf16 autocast only when `amp` on CUDA. `tta`: True = the 8 mirror flips, or a
    list of spatial-axis sets (0, 1, 2 of [X, Y, Z]); the identity is always included.
    `buffer_device` (default `device`) holds the volume and the aggregation buffers; a volume
    too large for the GPU keeps them on the CPU and sends each batch of patches to `device`.
    `outputs` (a sweep's store for this case and forward key) supplies the patch outputs it
    holds per flip and receives those computed here; `counts` adds the patch forward passes
    executed and reused (one per patch and flip).
    """
    if model.training:
        raise ValueError("sliding_window_probs: call model.eval() first")
    device = torch.device(device)
    patch = np.asarray([int(s) for s in patch_size_vox])
    overlap_vox = np.asarray(overlap_to_voxels(overlap, patch))
    shape = np.asarray(image.shape[1:])
    starts = patch_starts(shape, patch, overlap_vox)
    flips = _flip_sets(tta)
    use_amp = amp and device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_amp else nullcontext()
    buffers = device if buffer_device is None else torch.device(buffer_device)
    volume = image.to(device=buffers, dtype=torch.float32)
    window = None if aggregation == "crop" else blending_window(patch, aggregation, buffers)
    out = blended = None
    n_batches = -(-len(starts) // batch_size)
    forwards = _Forwards(flips, n_batches, outputs, counts, device)
    for index, first in enumerate(range(0, len(starts), batch_size)):
        regions = [_region(start, start + patch) for start in starts[first : first + batch_size]]

        def make_batch(regions=regions) -> torch.Tensor:
            return torch.stack([volume[r] for r in regions]).to(device)

        probs = forwards.probs(index, model, make_batch, autocast).to(buffers)
        n_classes = int(forwards.n_classes)
        if out is None:
            out = torch.empty((n_classes, *shape), dtype=torch.float32, device=buffers)
            blended = out[1:] if n_classes == 2 else out  # class 0 of 2: filled in at the end
            blended.zero_()
        for offset, (region, patch_probs) in enumerate(zip(regions, probs, strict=True)):
            if window is None:
                start = starts[first + offset]
                volume_region, patch_region = _crop_regions(start, patch, shape, overlap_vox // 2)
                blended[volume_region] = patch_probs[patch_region]
            else:
                blended[region].addcmul_(patch_probs, window)
    forwards.finish()
    if window is not None:
        _divide_by_window_sum(blended, starts, shape, patch, aggregation, window)
    if blends_logits(model):
        activate_blended(blended)
    if out.shape[0] == 2:
        out[0].fill_(1.0).sub_(out[1])
    return out


def decode(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """[K, ...] probabilities → labels [...] (uint8 up to 256 classes): argmax for K > 1 (the
    first class wins ties), p >= threshold for K == 1."""
    dtype = torch.uint8 if probs.shape[0] <= 256 else torch.int32
    if probs.shape[0] == 1:
        return (probs[0] >= threshold).to(dtype)
    labels = (probs[1] > probs[0]).to(dtype)  # class by class: argmax(dim=0) is slow on CPU
    best = probs[0]
    for k in range(2, probs.shape[0]):
        best = torch.maximum(best, probs[k - 1])
        better = probs[k] > best
        labels.mul_(~better).add_(better.to(dtype), alpha=k)
    return labels


def resolve_device(name: str) -> torch.device:
    """'auto' → CUDA if available, else CPU; 'cuda' without CUDA is a `ConfigError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"inference.device={name!r}: CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"inference.device={name!r}: {error}") from error

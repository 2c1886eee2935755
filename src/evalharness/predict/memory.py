"""Memory budget of the sliding-window aggregation: on the model's device, or on the CPU.

The aggregation buffers of one volume (the input, the class probabilities and the blending
weights, float32 over the padded volume) are the largest allocations of a case. Before a case
runs, their size is compared with the device's free memory (`torch.cuda.mem_get_info` on CUDA,
the host's available memory on the CPU), capped by ``inference.max_device_memory_mb``: a volume
too large for a GPU is aggregated on the CPU instead (patches still run on the GPU), with a
warning; one too large for the CPU fails the case, not the run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import torch
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from evalharness.errors import CaseError

LIMIT_KEY = "inference.max_device_memory_mb"
MB = 1 << 20
CPU = torch.device("cpu")


@dataclass(frozen=True)
class BufferPlan:
    """Where the aggregation buffers go, and the warning to show when that is a fallback."""

    device: torch.device
    warning: str | None = None


def aggregation_bytes(
    shape_vox: Sequence[int], n_input_channels: int, n_output_channels: int, aggregation: str
) -> int:
    """Bytes of one volume's buffers: input [C], probabilities [K] and, unless `aggregation` is
    'crop', the summed weights [1], all float32 over the (padded) volume `shape_vox`."""
    planes = n_input_channels + n_output_channels + (0 if aggregation == "crop" else 1)
    return 4 * planes * math.prod(int(s) for s in shape_vox)


def host_available_bytes() -> int:
    """Memory the host can still give (MemAvailable of /proc/meminfo; free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_image_fits(path: Path) -> None:
    """`CaseError` when reading the image at `path` would need more memory than the host can
    give: its header's voxels times the file's voxel size plus two float32 copies (the read
    volume and the preprocessed one). A header claiming absurd dimensions (corrupt, hostile,
    or a gzip bomb: a small file decompressing to terabytes) fails the case instead of the
    process running out of memory. Files nibabel cannot read are left to the reader."""
    try:
        header = nib.load(str(path)).header
        shape, dtype = header.get_data_shape(), header.get_data_dtype()
    except (ImageFileError, HeaderDataError, OSError, ValueError, EOFError):
        return
    need = math.prod(int(n) for n in shape) * (dtype.itemsize + 8)
    available = host_available_bytes()
    if need > available:
        raise CaseError(
            f"{path}: reading it needs about {need / MB:.0f} MB (header dimensions "
            f"{'x'.join(str(n) for n in shape)} of {dtype}), more than the "
            f"{available / MB:.0f} MB of memory available"
        )


def plan_buffers(
    device: torch.device,
    needed_bytes: int,
    device_free_bytes: int,
    cpu_free_bytes: int,
    limit_mb: float | None = None,
) -> BufferPlan:
    """Keep the buffers on `device` when they fit its budget (free memory, capped by `limit_mb`);
    else fall back to the CPU when they fit there; else `CaseError`. Pure: memory is given."""
    budget = device_free_bytes if limit_mb is None else min(device_free_bytes, limit_mb * MB)
    if needed_bytes <= budget:
        return BufferPlan(device)
    limit = f" ({LIMIT_KEY}={limit_mb:g})" if limit_mb is not None else ""
    need = f"the aggregation buffers need {needed_bytes / MB:.1f} MB"
    if device.type != "cpu" and needed_bytes <= cpu_free_bytes:
        return BufferPlan(
            CPU,
            f"{need}, more than the {budget / MB:.1f} MB available on {device}{limit}: "
            "aggregating this volume on the CPU (slower)",
        )
    raise CaseError(
        f"{need}, more than the {budget / MB:.1f} MB available on {device}{limit}"
        + ("" if device.type == "cpu" else f" and the {cpu_free_bytes / MB:.1f} MB on the CPU")
        + "; expected a smaller volume, a coarser preprocessing.target_spacing or more memory"
    )


def plan_for(
    device: torch.device,
    shape_vox: Sequence[int],
    n_input_channels: int,
    n_output_channels: int,
    aggregation: str,
    limit_mb: float | None,
) -> BufferPlan:
    """`plan_buffers` for one volume, with the free memory measured now."""
    needed = aggregation_bytes(shape_vox, n_input_channels, n_output_channels, aggregation)
    cpu_free = host_available_bytes()
    device_free = cpu_free if device.type == "cpu" else int(torch.cuda.mem_get_info(device)[0])
    return plan_buffers(device, needed, device_free, cpu_free, limit_mb)


def reset_peak_memory(device: torch.device) -> None:
    """Start measuring the peak: CUDA's allocator peak, else the process's resident peak
    (Linux: writing 5 to ``/proc/self/clear_refs`` resets VmHWM; elsewhere it is kept)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak since the process started


def peak_memory_mb(device: torch.device) -> float:
    """MiB: CUDA's allocator peak on `device`, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux: KiB

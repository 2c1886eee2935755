"""Time the harness's per-case inference path against the model's bare forward passes.

The case: a synthetic LPS volume (default 320x320x110 at 1.25x1.25x1.37 mm, so the harness
reorients it; the target spacing equals the file's, so the grid matches issue 6's table) and
its label, written to .nii.gz files in a temporary folder (by a child process, so building it
does not count towards this process's peak memory). The model: MONAI's 3-D UNet (1 input
channel, 2 classes, `--channels`, strides 2, one residual unit) with random weights, in eval
mode. Settings: patch 128x128x64, overlap 0.5, hann blending, batch 4, z-normalisation,
keep-largest-component on.

Measured in one process after one warm-up, `--repeats` times, interleaved:

- `forward_seconds`: only `model(batch)` over the same patches in the same batches (the
  batches are sliced from the preprocessed volume outside the timer);
- `harness_inference_seconds`: file → `load_case_inputs` → `predict` (restored, decoded,
  post-processed prediction on the native grid; no metrics), the model wrapped in a clock that
  also times its forward passes inside that very run (`forward_in_harness_seconds`);
- a per-step breakdown of the same path (load, preprocess, sliding window less its forward
  passes, forward passes, restore + decode (`native_labels`), post-process (keep-largest)),
  timed step by step in another pass;
- `metrics_seconds`, `monai_hd95_seconds` from `bench_metrics.measure_metrics` on the shape.

Minimums are the headline figures, [min, max] ranges come along. `inference_overhead_ratio`
is min(harness) / min(forward), as issue 6 defines it; on a shared machine the two minimums
can come from differently loaded moments, so `inference_overhead_ratio_paired` also gives
harness / forward-in-harness per repeat (the same run, the same load): median and range.
Peak resident memory (`resource.getrusage`, this process only): `peak_rss_harness_mb` right
after the warm-up run of the harness's path (the model, the libraries and one case: what an
evaluation needs), `peak_rss_inference_mb` before the metric benchmark, `peak_rss_mb` at the
end.

    PYTHONPATH=src python benchmarks/bench_inference.py --json out.json
    PYTHONPATH=src python benchmarks/bench_inference.py --shape 512,512,300 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from bench_metrics import measure_metrics
from monai.networks.nets import UNet

from evalharness.config.rules import overlap_to_voxels
from evalharness.config.settings import EffectiveSettings
from evalharness.data.datasets import Case
from evalharness.data.nifti_io import load_label, load_volume, write_nifti
from evalharness.demo.synthetic import make_case
from evalharness.predict.pipeline import (
    load_case_inputs,
    native_labels,
    predict,
    preprocess_settings,
    window_probs,
)
from evalharness.predict.preprocess import (
    prepare_image,
)
from evalharness.predict.sliding_window import patch_starts
from evalharness.score.masks import keep_largest_component

SPACING_MM = (1.25, 1.25, 1.37)
AXCODES = "LPS"
PATCH_VOX = (128, 128, 64)
OVERLAP = 0.5
AGGREGATION = "hann"
BATCH_SIZE = 4
N_CLASSES = 2
T = TypeVar("T")
STEPS = (
    "load",
    "preprocess",
    "forward",
    "sliding_window_other",
    "restore_decode",
    "postprocess",
)


def write_volume(folder: Path, shape: tuple[int, int, int]) -> None:
    """Write image.nii.gz and label.nii.gz of the benchmark case of `shape` into `folder`."""
    field_of_view_mm = tuple(n * s for n, s in zip(shape, SPACING_MM, strict=True))
    case = make_case(SPACING_MM, AXCODES, field_of_view_mm=field_of_view_mm)
    if case.image.shape != shape:
        raise RuntimeError(f"synthetic volume has shape {case.image.shape}, expected {shape}")
    write_nifti(folder / "image.nii.gz", case.image, case.affine)
    write_nifti(folder / "label.nii.gz", case.label, case.affine)


def write_volume_in_child(folder: Path, shape: tuple[int, int, int]) -> None:
    """`write_volume` in a spawned process: its memory never counts towards ours."""
    child = multiprocessing.get_context("spawn").Process(target=write_volume, args=(folder, shape))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"writing the benchmark volume failed (exit code {child.exitcode})")


def bench_settings(device: str) -> EffectiveSettings:
    return EffectiveSettings(
        apply_reorder=True,
        target_spacing_mm=SPACING_MM,
        normalization=({"name": "ZNormalization", "masking_method": None, "channel_wise": True},),
        padding_mode=0,
        patch_size_vox=PATCH_VOX,
        overlap=OVERLAP,
        aggregation=AGGREGATION,
        keep_largest_component=True,
        threshold=0.5,
        batch_size=BATCH_SIZE,
        device=device,
        amp=False,
        tta=False,
    )


def build_model(channels: tuple[int, ...], device: torch.device) -> torch.nn.Module:
    strides = (2,) * (len(channels) - 1)
    model = UNet(3, 1, N_CLASSES, channels=channels, strides=strides, num_res_units=1)
    return model.to(device).eval()


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Timer:
    """Wall seconds of calls, synchronising CUDA around each so the device work is counted."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, run: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[float, T]:
        """(seconds, result) of `run(*args, **kwargs)`."""
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = run(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, result


class ForwardClock(torch.nn.Module):
    """`model` with the seconds of its forward passes added up in `seconds` (CUDA: events, so
    timing adds no synchronisation; read `seconds` after a synchronising call)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.cuda = next(model.parameters()).is_cuda
        self.cpu_seconds = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            output = self.model(batch)
            end.record()
            self.events.append((start, end))
            return output
        started = time.perf_counter()
        output = self.model(batch)
        self.cpu_seconds += time.perf_counter() - started
        return output

    def take_seconds(self) -> float:
        """Forward seconds since the last call."""
        seconds = self.cpu_seconds + sum(a.elapsed_time(b) for a, b in self.events) / 1000.0
        self.cpu_seconds, self.events = 0.0, []
        return seconds


def forward_seconds(
    model: torch.nn.Module, volume: torch.Tensor, starts: np.ndarray, timer: Timer
) -> float:
    """Seconds of `model(batch)` alone over the patches at `starts` [N, 3] of `volume`
    [C, X, Y, Z] (already on the model's device), in batches of `BATCH_SIZE`."""
    patch = np.asarray(PATCH_VOX)
    total = 0.0
    with torch.inference_mode():
        for first in range(0, len(starts), BATCH_SIZE):
            regions = [
                (slice(None), *(slice(int(a), int(a + p)) for a, p in zip(s, patch, strict=True)))
                for s in starts[first : first + BATCH_SIZE]
            ]
            batch = torch.stack([volume[r] for r in regions])
            seconds, _ = timer(model, batch)
            total += seconds
    return total


def step_seconds(
    model: ForwardClock,
    case: Case,
    settings: EffectiveSettings,
    device: torch.device,
    timer: Timer,
) -> dict[str, float]:
    """The per-case path step by step, with the public functions `predict` is made of.

    'preprocess' is `prepare_image` less a bare read of the same file (`load_volume`)."""
    pre = preprocess_settings(settings)
    read_s, _ = timer(load_volume, case.image)
    label_s, _ = timer(load_label, case.label)
    prepare_s, prepared = timer(prepare_image, case.image, pre)
    window_s, probs = timer(window_probs, model, prepared, settings, device)
    forward_s = model.take_seconds()
    restore_s, labels = timer(native_labels, probs, prepared, settings.threshold)
    del probs, prepared  # as `predict` does: bounds the breakdown's memory too
    postprocess_s, _ = timer(postprocess, labels)
    return {
        "load": read_s + label_s,
        "preprocess": prepare_s - read_s,
        "forward": forward_s,
        "sliding_window_other": window_s - forward_s,
        "restore_decode": restore_s,
        "postprocess": postprocess_s,
    }


def postprocess(labels: np.ndarray) -> np.ndarray:
    """Keep-largest-component, as `predict` does for up to two classes."""
    return keep_largest_component(labels > 0).astype(np.uint8)


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def rounded(values: list[float]) -> list[float]:
    return [round(v, 4) for v in values]


def span(values: list[float]) -> list[float]:
    return [round(min(values), 4), round(max(values), 4)]


def measure(
    shape: tuple[int, int, int],
    channels: tuple[int, ...],
    device: torch.device,
    repeats: int,
    metrics: bool = True,
) -> dict:
    """Every figure of the module doc, as a JSON-ready dict."""
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        folder = Path(tmp)
        write_volume_in_child(folder, shape)
        case = Case("bench", folder / "image.nii.gz", folder / "label.nii.gz")
        settings = bench_settings(device.type)
        model = build_model(channels, device)
        clocked = ForwardClock(model).eval()
        timer = Timer(device)
        rss_ready = peak_rss_mb()

        def harness() -> np.ndarray:
            inputs = load_case_inputs(case, preprocess_settings(settings))
            return predict(clocked, inputs.prepared, settings, device).labels

        harness()  # warm-up: allocator, MKL-DNN primitives, the blending window, page cache
        clocked.take_seconds()
        rss_harness = peak_rss_mb()  # nothing but the harness's path has run yet
        prepared = load_case_inputs(case, preprocess_settings(settings)).prepared
        volume = prepared.tensor.to(device)
        patch = np.asarray(PATCH_VOX)
        starts = patch_starts(volume.shape[1:], patch, overlap_to_voxels(OVERLAP, patch))
        del prepared
        forward, harness_s, forward_in, steps = [], [], [], {name: [] for name in STEPS}
        for _ in range(repeats):
            forward.append(forward_seconds(model, volume, starts, timer))
            seconds, prediction = timer(harness)
            harness_s.append(seconds)
            forward_in.append(clocked.take_seconds())
            del prediction
            for name, value in step_seconds(clocked, case, settings, device, timer).items():
                steps[name].append(value)
        peak_device_mb = (
            torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        )
        del volume
    rss_inference = peak_rss_mb()
    metric_figures = measure_metrics(shape, repeats=repeats) if metrics else {}
    ratios = [h / f for h, f in zip(harness_s, forward, strict=True)]
    paired = [h / f for h, f in zip(harness_s, forward_in, strict=True)]
    return {
        "shape_vox": list(shape),
        "spacing_mm": list(SPACING_MM),
        "channels": list(channels),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "n_patches": int(len(starts)),
        "repeats": repeats,
        "forward_seconds": round(min(forward), 4),
        "forward_seconds_range": span(forward),
        "harness_inference_seconds": round(min(harness_s), 4),
        "harness_inference_seconds_range": span(harness_s),
        "inference_overhead_ratio": round(min(harness_s) / min(forward), 4),
        "inference_overhead_ratio_range": span(ratios),
        "forward_in_harness_seconds_range": span(forward_in),
        "inference_overhead_ratio_paired": round(float(np.median(paired)), 4),
        "inference_overhead_ratio_paired_range": span(paired),
        "per_repeat_seconds": {
            "bare_forward": rounded(forward),
            "harness_inference": rounded(harness_s),
            "forward_in_harness": rounded(forward_in),
            **{name: rounded(v) for name, v in steps.items()},
        },
        "steps_seconds": {name: round(min(v), 4) for name, v in steps.items()},
        "steps_seconds_range": {name: span(v) for name, v in steps.items()},
        **{k: round(v, 4) for k, v in metric_figures.items()},
        "peak_rss_ready_mb": round(rss_ready, 1),
        "peak_rss_harness_mb": round(rss_harness, 1),
        "peak_rss_inference_mb": round(rss_inference, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_device_mb": None if peak_device_mb is None else round(peak_device_mb, 1),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def print_table(result: dict) -> None:
    """The headline figures and the per-step breakdown, one per line."""
    rows = [
        ("volume", f"{result['shape_vox']} on {result['device']}, {result['n_patches']} patches"),
        ("forward_seconds", _with_range(result, "forward_seconds")),
        ("harness_inference_seconds", _with_range(result, "harness_inference_seconds")),
        ("inference_overhead_ratio (<= 1.15)", _with_range(result, "inference_overhead_ratio")),
        ("  paired, same run (median)", _with_range(result, "inference_overhead_ratio_paired")),
    ]
    for name in STEPS:
        low, high = result["steps_seconds_range"][name]
        rows.append((f"  step {name}", f"{low:.3f} [{low:.3f}, {high:.3f}]"))
    if "metrics_seconds" in result:
        rows += [
            ("metrics_seconds", f"{result['metrics_seconds']:.3f}"),
            ("monai_hd95_seconds", f"{result['monai_hd95_seconds']:.3f}"),
            (
                "metrics_ratio_vs_monai_hd95 (<= 1.0)",
                f"{result['metrics_ratio_vs_monai_hd95']:.3f}",
            ),
        ]
    rows += [
        ("peak_rss_harness_mb (model + one case)", f"{result['peak_rss_harness_mb']:.0f}"),
        ("peak_rss_inference_mb", f"{result['peak_rss_inference_mb']:.0f}"),
        ("peak_rss_mb", f"{result['peak_rss_mb']:.0f}"),
        (
            "load average before / after",
            f"{result['load_average_before']} / {result['load_average_after']}",
        ),
    ]
    if result["peak_device_mb"] is not None:
        rows.append(("peak_device_mb", f"{result['peak_device_mb']:.0f}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _with_range(result: dict, key: str) -> str:
    low, high = result[f"{key}_range"]
    return f"{result[key]:.3f} [{low:.3f}, {high:.3f}]"


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    parser.add_argument("--channels", default="8,16,32,64", help="UNet channels per level")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--shape", default="320,320,110", help="X,Y,Z in voxels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-metrics", action="store_true", help="skip the metric benchmark")
    args = parser.parse_args()
    shape = cast(tuple[int, int, int], tuple(int(n) for n in args.shape.split(",")))
    channels = tuple(int(n) for n in args.channels.split(","))
    if len(shape) != 3:
        parser.error(f"--shape needs three sizes X,Y,Z, got {args.shape!r}")
    if len(channels) < 2:
        parser.error(f"--channels needs at least two levels, got {args.channels!r}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available on this machine")
    result = measure(shape, channels, device, args.repeats, metrics=not args.no_metrics)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

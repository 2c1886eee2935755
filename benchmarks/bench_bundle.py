"""Time the harness on a MONAI bundle against the bundle's own workflow, in one process.

The bundle (default: the Model Zoo's spleen_ct_segmentation configs with the fixture's weights,
`tests/fixtures/monai-bundle-spleen/`) and its test images (``<data>/imagesTs/*.nii.gz``, what
its ``datalist`` globs). Per repeat, interleaved, after one warm-up of each side:

- `bundle`: MONAI's own workflow, ``create_workflow(config_file=configs/inference.json,
  workflow_type="infer", bundle_root, dataset_dir, output_dir)`` (parses the config,
  instantiates everything, loads the checkpoint: `bundle_setup_seconds`) then ``run()``: its
  evaluator with its DataLoader, SlidingWindowInferer, Activationsd, Invertd, AsDiscreted and
  SaveImaged writing ``<case>/<case>_trans.nii.gz`` (`bundle_run_seconds`, per case
  `bundle_seconds_per_case`);
- `harness`: the bundle read and checked and its network loaded (`harness_setup_seconds`), then
  per case file -> `load_case_inputs` (the bundle's preprocessing by MONAI) -> `predict` (the
  harness's sliding window, Invertd, argmax) -> `<case>_pred.nii.gz` written
  (`harness_seconds_per_case`; no metrics, which the bundle's inference does not compute).

The same device, the same torch threads (`--threads`, default torch's). `ratio_per_case` =
min(harness per case) / min(bundle per case), the issue's figure (goal <= 1.0 on the CPU);
`ratio_with_setup` adds each side's setup once per run. Every repeat checks that both sides
wrote the same label maps (`voxels_differing`). ``--bundle-workers`` overrides the bundle
DataLoader's ``num_workers`` (the spleen config says 4; 0 loads in the main process, as the
harness's one prefetch thread does).

    PYTHONPATH=src python benchmarks/bench_bundle.py --repeats 3 --json bundle.json
    PYTHONPATH=src python benchmarks/bench_bundle.py --bundle-workers 0
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from evalharness.config.schema import EvalConfig, InferenceConfig, ModelConfig
from evalharness.config.settings import resolve_settings
from evalharness.data.datasets import Case
from evalharness.data.nifti_io import write_nifti
from evalharness.model.bundle import load_bundle_network
from evalharness.model.bundle_source import resolve_bundle
from evalharness.predict.pipeline import load_case_inputs, predict, preprocess_settings

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "monai-bundle-spleen"


def run_bundle(bundle: Path, data: Path, out: Path, workers: int | None) -> tuple[float, float]:
    """(setup seconds, run seconds) of MONAI's own workflow writing its predictions to `out`."""
    from monai.bundle import create_workflow

    overrides: dict[str, Any] = {}
    if workers is not None:
        overrides["dataloader#num_workers"] = workers
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        workflow = create_workflow(
            config_file=str(bundle / "configs" / "inference.json"),
            workflow_type="infer",
            bundle_root=str(bundle),
            dataset_dir=str(data),
            output_dir=str(out),
            **overrides,
        )
        setup = time.perf_counter() - started
        started = time.perf_counter()
        workflow.run()
        ran = time.perf_counter() - started
        workflow.finalize()
    return setup, ran


def run_harness(bundle: Path, images: list[Path], out: Path, batch: int) -> tuple[float, float]:
    """(setup seconds, seconds per case) of the harness's path, predictions written to `out`."""
    started = time.perf_counter()
    resolved = resolve_bundle(ModelConfig(family="bundle", path=str(bundle)), "", out)
    contents = resolved.contents
    config = EvalConfig(inference=InferenceConfig(device="cpu", batch_size=batch))
    settings, _, _ = resolve_settings(config, contents.contract.training.values)
    pre = preprocess_settings(settings, contents.contract.pipeline)
    network = load_bundle_network(contents.bundle).network
    device = torch.device("cpu")
    setup = time.perf_counter() - started
    started = time.perf_counter()
    for image in images:
        case_id = image.name.removesuffix(".nii.gz")
        inputs = load_case_inputs(Case(case_id, image, None), pre)
        prediction = predict(network, inputs.prepared, settings, device, 2)
        write_nifti(out / f"{case_id}_pred.nii.gz", prediction.labels, inputs.prepared.native.affine)
    return setup, (time.perf_counter() - started) / len(images)


def differing(harness_out: Path, bundle_out: Path, images: list[Path]) -> int:
    total = 0
    for image in images:
        case = image.name.removesuffix(".nii.gz")
        ours = np.asarray(nib.load(harness_out / f"{case}_pred.nii.gz").dataobj)
        theirs = np.asarray(nib.load(bundle_out / case / f"{case}_trans.nii.gz").dataobj)
        total += int((ours != theirs).sum())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=FIXTURE / "bundle")
    parser.add_argument("--data", type=Path, default=FIXTURE / "data")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--bundle-workers", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = sorted((args.data / "imagesTs").glob("*.nii.gz"))
    inferer = json.loads((args.bundle / "configs" / "inference.json").read_text())["inferer"]
    batch = int(inferer.get("sw_batch_size", 1))
    rows: dict[str, list[float]] = {k: [] for k in ("bs", "br", "hs", "hc")}
    diffs = []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats + 1):  # the first is the warm-up
            b_out, h_out = Path(scratch) / f"b{repeat}", Path(scratch) / f"h{repeat}"
            b_setup, b_run = run_bundle(args.bundle, args.data, b_out, args.bundle_workers)
            h_setup, h_case = run_harness(args.bundle, images, h_out, batch)
            diffs.append(differing(h_out, b_out, images))
            if repeat:
                for key, value in zip(rows, (b_setup, b_run, h_setup, h_case), strict=True):
                    rows[key].append(value)
                print(f"repeat {repeat}: bundle {b_run / len(images):.2f} s/case (setup {b_setup:.2f} s), "
                      f"harness {h_case:.2f} s/case (setup {h_setup:.2f} s)")
    n = len(images)
    bundle_case = min(rows["br"]) / n
    harness_case = min(rows["hc"])
    result = {
        "cases": n,
        "threads": args.threads,
        "bundle_workers": args.bundle_workers,
        "device": "cpu",
        "bundle_setup_seconds": min(rows["bs"]),
        "bundle_run_seconds": min(rows["br"]),
        "bundle_seconds_per_case": bundle_case,
        "bundle_seconds_per_case_range": [min(rows["br"]) / n, max(rows["br"]) / n],
        "harness_setup_seconds": min(rows["hs"]),
        "harness_seconds_per_case": harness_case,
        "harness_seconds_per_case_range": [min(rows["hc"]), max(rows["hc"])],
        "ratio_per_case": harness_case / bundle_case,
        "ratio_with_setup": (min(rows["hs"]) + n * harness_case) / (min(rows["bs"]) + n * bundle_case),
        "voxels_differing": diffs,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

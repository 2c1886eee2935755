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
  per case its `BundleFamily` (what an evaluation runs): `load_inputs` (the bundle's
  preprocessing by MONAI; the next case loaded on one thread meanwhile, as the case loop's
  `run.prefetch`) -> `predict` (the harness's sliding window, Invertd, argmax) ->
  `<case>_pred.nii.gz` written (`harness_seconds_per_case`; no metrics, which the bundle's
  inference does not compute).

MONAI's workflow needs pytorch-ignite (its SupervisedEvaluator and CheckpointLoader); where
ignite is not installed (this machine's shared environment) `bundle` is `run_bundle_loop`: the
same parsed ids of the bundle in the loop that evaluator runs (`bundle_runner` says which).

The same device, the same torch threads (`--threads`, default torch's). `ratio_per_case` =
min(harness per case) / min(bundle per case), the issue's figure (goal <= 1.0 on the CPU;
on a loaded machine read `ratio_per_case_paired_median`, the ratio within each repeat);
`ratio_with_setup` adds each side's setup once per run. Every repeat checks that both sides
wrote the same label maps (`voxels_differing`). ``--bundle-workers`` overrides the bundle
DataLoader's ``num_workers`` (the spleen config says 4; 0 loads in the main process, as the
harness's one prefetch thread does).

    PYTHONPATH=src python benchmarks/bench_bundle.py --repeats 3 --json bundle.json
    PYTHONPATH=src python benchmarks/bench_bundle.py --bundle-workers 0
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from evalharness.config.schema import EvalConfig, InferenceConfig, ModelConfig
from evalharness.config.settings import resolve_settings
from evalharness.data.datasets import Case
from evalharness.data.nifti_io import write_nifti
from evalharness.model.bundle_source import resolve_bundle
from evalharness.predict.bundle_transforms import BundleFamily
from evalharness.predict.pipeline import preprocess_settings

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


def run_bundle_loop(
    bundle: Path, data: Path, out: Path, workers: int | None
) -> tuple[float, float]:
    """`run_bundle` without pytorch-ignite: the bundle's own parsed ids (imports, network,
    dataloader, inferer, postprocessing with SaveImaged) in the loop its SupervisedEvaluator
    runs (batch -> inferer -> decollate -> postprocessing), weights loaded as its
    CheckpointLoader does (a state dict into `network`)."""
    from monai.bundle import ConfigParser
    from monai.data import decollate_batch

    started = time.perf_counter()
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"], parser["dataset_dir"], parser["output_dir"] = map(
        str, (bundle, data, out)
    )
    if workers is not None:
        parser["dataloader"]["num_workers"] = workers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parser.get_parsed_content("imports")
        network = parser.get_parsed_content("network")
        network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
        network.eval()
        loader, inferer, post = (
            parser.get_parsed_content(i) for i in ("dataloader", "inferer", "postprocessing")
        )
        device = parser.get_parsed_content("device")
        setup = time.perf_counter() - started
        started = time.perf_counter()
        for batch in loader:
            with torch.no_grad():
                batch["pred"] = inferer(batch["image"].to(device), network)
            for item in decollate_batch(batch):
                post(item)
    return setup, time.perf_counter() - started


def run_harness(bundle: Path, images: list[Path], out: Path, batch: int) -> tuple[float, float]:
    """(setup seconds, seconds per case) of the harness's path, predictions written to `out`."""
    started = time.perf_counter()
    resolved = resolve_bundle(ModelConfig(family="bundle", path=str(bundle)), "", out)
    contents = resolved.contents
    config = EvalConfig(inference=InferenceConfig(device="cpu", batch_size=batch))
    settings, _, _ = resolve_settings(config, contents.contract.training.values)
    pre = preprocess_settings(settings)
    network = contents.load().network
    family = BundleFamily(contents, network, settings, torch.device("cpu"), 2)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    cases = [Case(image.name.removesuffix(".nii.gz"), image, None) for image in images]
    with ThreadPoolExecutor(max_workers=1) as prefetch:  # the case loop's run.prefetch=true
        loading = prefetch.submit(family.load_inputs, cases[0], pre)
        for index, case in enumerate(cases):
            inputs = loading.result()
            if index + 1 < len(cases):
                loading = prefetch.submit(family.load_inputs, cases[index + 1], pre)
            prediction = family.predict(inputs, False, None, None)
            labels, affine = prediction.labels, inputs.prepared.native.affine
            write_nifti(out / f"{case.case_id}_pred.nii.gz", labels, affine)
    return setup, (time.perf_counter() - started) / len(cases)


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
    runner = run_bundle if importlib.util.find_spec("ignite") else run_bundle_loop
    rows: dict[str, list[float]] = {k: [] for k in ("bs", "br", "hs", "hc")}
    diffs = []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats + 1):  # the first is the warm-up
            b_out, h_out = Path(scratch) / f"b{repeat}", Path(scratch) / f"h{repeat}"
            b_setup, b_run = runner(args.bundle, args.data, b_out, args.bundle_workers)
            h_setup, h_case = run_harness(args.bundle, images, h_out, batch)
            diffs.append(differing(h_out, b_out, images))
            if repeat:
                for key, value in zip(rows, (b_setup, b_run, h_setup, h_case), strict=True):
                    rows[key].append(value)
                print(
                    f"repeat {repeat}: bundle {b_run / len(images):.2f} s/case "
                    f"(setup {b_setup:.2f} s), harness {h_case:.2f} s/case (setup {h_setup:.2f} s)"
                )
    n = len(images)
    paired = [h / (b / n) for h, b in zip(rows["hc"], rows["br"], strict=True)]
    bundle_case = min(rows["br"]) / n
    harness_case = min(rows["hc"])
    result = {
        "bundle_runner": runner.__name__,
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
        "ratio_per_case_paired_median": float(np.median(paired)),
        "ratio_per_case_paired_range": [min(paired), max(paired)],
        "ratio_with_setup": (min(rows["hs"]) + n * harness_case)
        / (min(rows["bs"]) + n * bundle_case),
        "voxels_differing": diffs,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Time the harness on an nnU-Net model against nnU-Net's own ``nnUNetPredictor``.

The same model folder (the test fixture: ``tests/fixtures/nnunet_binary``, fold 0), the same
images (its ``imagesTs``), the same settings (step size, mirroring), the same device and the
same torch threads, in one process, interleaved `--repeats` times:

- nnU-Net: ``nnUNetPredictor.initialize_from_trained_model_folder`` once, then per case
  ``predict_from_files_sequential`` (read, preprocess, sliding window, export, write the
  ``.nii.gz``): its wall time per case; its forward passes counted by a forward hook on its
  network;
- the harness: a whole evaluation (``evaluate``: plan, model, per case load + predict + score +
  write the prediction, the MLflow run; plots off) on the same cases: `harness_case_s` is the
  mean of its per-case ``seconds_paid`` (what each case cost in its case loop), `harness_run_s`
  the whole evaluation's wall time per case; its forward passes from the run's metrics.

Both sides' forward passes are timed by global module hooks on the network class the plans
name (`forward_s`), so the time around them (`other_s` = case - forward: reading,
preprocessing, blending, export, and for the harness scoring and tracking) can be compared
even when the shared machine's load moves the forward passes' time between the two sides.
Ratios are harness / nnU-Net per case (goal <= 1.0), minimum over repeats of each side; the
paired ratio is per repeat (adjacent measurements).

    PYTHONPATH=src python benchmarks/bench_nnunet.py --threads 2 --json out.json
    PYTHONPATH=src python benchmarks/bench_nnunet.py --mirroring --step 0.5 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "nnunet_binary"
MODEL = (
    FIXTURE
    / "nnUNet_results"
    / "Dataset501_HeartSynth"
    / "nnUNetTrainer_1epoch__nnUNetSmallPlans__3d_fullres"
)
RAW = FIXTURE / "nnUNet_raw" / "Dataset501_HeartSynth"


class ForwardClock:
    """Counts and times the forward passes of modules named `class_name`, whoever runs them."""

    def __init__(self, class_name: str) -> None:
        self.class_name, self.passes, self.seconds, self._started = class_name, 0, 0.0, 0.0
        hooks = torch.nn.modules.module
        self._handles = [
            hooks.register_module_forward_pre_hook(self._pre),
            hooks.register_module_forward_hook(self._post),
        ]

    def _pre(self, module: torch.nn.Module, _: object) -> None:
        if type(module).__name__ == self.class_name:
            self._started = time.perf_counter()

    def _post(self, module: torch.nn.Module, _: object, __: object) -> None:
        if type(module).__name__ == self.class_name:
            self.passes += 1
            self.seconds += time.perf_counter() - self._started

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def nnunet_side(step: float, mirroring: bool, device: torch.device, out: Path) -> dict:
    """nnUNetPredictor on every test image: seconds per case and forward passes."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(
            tile_step_size=step,
            use_mirroring=mirroring,
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=False,
            allow_tqdm=False,
        )
        predictor.initialize_from_trained_model_folder(str(MODEL), use_folds=(0,))
    clock = ForwardClock(type(predictor.network).__name__)
    images = sorted((RAW / "imagesTs").glob("*_0000.nii.gz"))
    seconds = []
    for image in images:
        target = out / image.name.removesuffix("_0000.nii.gz")
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            predictor.predict_from_files_sequential(
                [[str(image)]], [str(target)], False, True, None
            )
        seconds.append(time.perf_counter() - started)
    clock.close()
    n = len(seconds)
    case_s = sum(seconds) / n
    forward_s = clock.seconds / n
    return {
        "case_s": case_s,
        "forward_s": forward_s,
        "other_s": case_s - forward_s,
        "forward_passes": clock.passes,
    }


def harness_side(step: float, mirroring: bool, device: torch.device, out: Path) -> dict:
    """A whole harness evaluation of the same cases: seconds per case and forward passes."""
    from hydra import compose, initialize_config_dir
    from mlflow.tracking import MlflowClient

    from evalharness.cli import config_from, register_configs
    from evalharness.evaluation.run import evaluate

    uri = f"sqlite:///{out / 'mlflow.db'}"
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"mlflow.tracking_uri={uri}",
                "model=nnunet",
                f"model.path={MODEL}",
                "model.folds=[0]",
                "data=nnunet",
                f"data.root={RAW}",
                f"patch.overlap={1.0 - step}",
                f"inference.tta={str(mirroring).lower()}",
                f"inference.device={device.type}",
                "output.plots=false",
                "output.save_predictions=true",
            ],
        )
    clock = ForwardClock("PlainConvUNet")
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        outcome = evaluate(config_from(cfg), out / "run")
    wall = time.perf_counter() - started
    clock.close()
    client = MlflowClient(tracking_uri=uri)
    table = pd.read_csv(client.download_artifacts(outcome.run_id, "per_case.csv", str(out)))
    metrics = client.get_run(outcome.run_id).data.metrics
    case_s = float(table["seconds_paid"].mean())
    forward_s = clock.seconds / len(table)
    return {
        "case_s": case_s,
        "forward_s": forward_s,
        "other_s": case_s - forward_s,
        "run_s": wall / len(table),
        "forward_passes": int(metrics["forward_passes"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=float, default=0.5)
    parser.add_argument("--mirroring", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runs: dict[str, list[dict]] = {"nnunet": [], "harness": []}
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            (folder / "nnunet").mkdir()
            (folder / "harness").mkdir()
            runs["nnunet"].append(nnunet_side(args.step, args.mirroring, device, folder / "nnunet"))
            runs["harness"].append(
                harness_side(args.step, args.mirroring, device, folder / "harness")
            )
        print(
            f"repeat {repeat}: {json.dumps(runs['nnunet'][-1])} {json.dumps(runs['harness'][-1])}"
        )
    nnunet_s = min(r["case_s"] for r in runs["nnunet"])
    harness_s = min(r["case_s"] for r in runs["harness"])
    harness_run_s = min(r["run_s"] for r in runs["harness"])
    pairs = zip(runs["nnunet"], runs["harness"], strict=True)
    paired = [h["case_s"] / n["case_s"] for n, h in pairs]
    other_n = min(r["other_s"] for r in runs["nnunet"])
    other_h = min(r["other_s"] for r in runs["harness"])
    result = {
        "settings": {
            "step": args.step,
            "mirroring": args.mirroring,
            "threads": args.threads,
            "device": args.device,
            "torch": torch.__version__,
            "repeats": args.repeats,
        },
        "nnunet_case_s": nnunet_s,
        "harness_case_s": harness_s,
        "harness_run_s": harness_run_s,
        "ratio_case": harness_s / nnunet_s,
        "ratio_run": harness_run_s / nnunet_s,
        "ratio_case_paired": paired,
        "nnunet_other_s": other_n,
        "harness_other_s": other_h,
        "forward_s": {
            "nnunet": min(r["forward_s"] for r in runs["nnunet"]),
            "harness": min(r["forward_s"] for r in runs["harness"]),
        },
        "forward_passes": {
            "nnunet": runs["nnunet"][0]["forward_passes"],
            "harness": runs["harness"][0]["forward_passes"],
        },
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

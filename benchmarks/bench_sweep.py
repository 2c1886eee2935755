"""Time a K-setting sweep on the demo against K single evaluations of the same settings.

The K settings are a grid of `inference.aggregation` x `patch.overlap` (K = 4: hann, gaussian
x 0.25, 0.5). Every evaluation is a real `python -m evalharness` process in a work folder of
its own (a temporary one unless `--workdir`): the K singles one after another, then one
`python -m evalharness -m ...` over the same K settings (Hydra's basic launcher: one process,
so whatever the harness caches in the process is reused across jobs). A warm-up evaluation
with a setting outside the grid first builds the demo (data, trained model, training run in the
store), so neither side pays for that. `sweep.resume=false run.resume=false` make every
setting really evaluate; `--override KEY=VALUE` (repeatable) goes to every evaluation, e.g.
`--override output.plots=false` to see what the figures cost. With `--repeats` > 1 singles and
sweep alternate; minimums are the headline figures.

    sweep_reuse_ratio = sweep seconds / sum of the K singles' seconds   (goal <= 0.6, K = 4)

    python benchmarks/bench_sweep.py --k 4 --size demo --json sweep.json

`--mode sharing` measures forward-pass sharing instead: the 8-setting sweep
`inference.aggregation=hann,gaussian,average,crop inference.keep_largest_component=true,false`
against its 8 single evaluations, then `patch.overlap=0.25,0.5 inference.aggregation=hann,gaussian`
against its 4, reading the forward passes every run logs:

    forward_passes_ratio = forward passes of the sweep (the parent's total) / the mean of its
                           singles' (goal <= 1.0 for the 8 settings, <= 2.0 for two overlaps)
    sweep_cost_ratio     = sweep seconds / sum of the singles' seconds   (goal <= 0.2, 8 settings)

    python benchmarks/bench_sweep.py --mode sharing --size demo --json sharing.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

AGGREGATIONS = ("hann", "gaussian", "average", "crop")
OVERLAPS = ("0.25", "0.5", "0.75")
WARM_UP = ("inference.aggregation=hann", "patch.overlap=0.125")


def base_overrides(size: str, workdir: Path, overrides: Sequence[str]) -> list[str]:
    """What every run of a benchmark shares: the demo, one store, nothing resumed."""
    return [
        f"demo.size={size}",
        f"demo.cache_dir={workdir / 'demo'}",
        f"mlflow.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        "sweep.resume=false",
        "run.resume=false",
        *overrides,
    ]


def grid(k: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(aggregations, overlaps) whose product has `k` settings; ValueError if none."""
    for n_overlaps in (2, 3, 1):
        if k % n_overlaps == 0 and k // n_overlaps <= len(AGGREGATIONS):
            return AGGREGATIONS[: k // n_overlaps], OVERLAPS[:n_overlaps]
    raise ValueError(f"--k {k}: not a grid of up to {len(AGGREGATIONS)} x {len(OVERLAPS)}")


def run_seconds(args: list[str], cwd: Path) -> float:
    """Wall seconds of `python -m evalharness args` in `cwd`; RuntimeError if it fails."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "evalharness", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
        raise RuntimeError(f"python -m evalharness {' '.join(args)} failed:\n{tail}")
    return seconds


def measure(k: int, size: str, workdir: Path, repeats: int, overrides: list[str]) -> dict:
    """Seconds of the K singles and of the sweep, and their ratio (module doc)."""
    aggregations, overlaps = grid(k)
    base = base_overrides(size, workdir, overrides)
    load_before = [round(v, 2) for v in os.getloadavg()]
    warm_up_s = run_seconds([*base, *WARM_UP, f"hydra.run.dir={workdir / 'runs/warm_up'}"], workdir)
    singles, sweeps = [], []
    for repeat in range(repeats):
        seconds = []
        for index, (aggregation, overlap) in enumerate(itertools.product(aggregations, overlaps)):
            run_dir = workdir / f"runs/single_{repeat}_{index}"
            settings = [f"inference.aggregation={aggregation}", f"patch.overlap={overlap}"]
            seconds.append(run_seconds([*base, *settings, f"hydra.run.dir={run_dir}"], workdir))
        singles.append(seconds)
        sweep = [
            "-m",
            *base,
            f"inference.aggregation={','.join(aggregations)}",
            f"patch.overlap={','.join(overlaps)}",
            f"hydra.sweep.dir={workdir / f'sweeps/sweep_{repeat}'}",
        ]
        sweeps.append(run_seconds(sweep, workdir))
    sums = [sum(s) for s in singles]
    ratios = [w / s for w, s in zip(sweeps, sums, strict=True)]
    return {
        "k": k,
        "size": size,
        "aggregations": list(aggregations),
        "overlaps": [float(o) for o in overlaps],
        "repeats": repeats,
        "overrides": overrides,
        "warm_up_seconds": round(warm_up_s, 2),
        "single_seconds": [[round(s, 2) for s in row] for row in singles],
        "singles_sum_seconds": round(min(sums), 2),
        "sweep_seconds": round(min(sweeps), 2),
        "sweep_reuse_ratio": round(min(sweeps) / min(sums), 3),
        "sweep_reuse_ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
        "load_average_before": load_before,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }


SHARING_SWEEPS = {
    "aggregation_x_keep_largest": {
        "inference.aggregation": ("hann", "gaussian", "average", "crop"),
        "inference.keep_largest_component": ("true", "false"),
    },
    "overlap_x_aggregation": {
        "patch.overlap": ("0.25", "0.5"),
        "inference.aggregation": ("hann", "gaussian"),
    },
}


def _metric(workdir: Path, run_name: str, metric: str) -> float:
    """`metric` of the newest run named `run_name` in the benchmark's store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("evalharness")
    [run] = client.search_runs(
        [experiment.experiment_id],
        f"attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return float(run.data.metrics[metric])


def measure_sharing(
    size: str, workdir: Path, overrides: list[str], names: list[str] | None = None
) -> dict:
    """Forward passes and seconds of each sharing sweep against its single evaluations."""
    base = base_overrides(size, workdir, overrides)
    load_before = [round(v, 2) for v in os.getloadavg()]
    warm_up_s = run_seconds([*base, *WARM_UP, f"hydra.run.dir={workdir / 'runs/warm_up'}"], workdir)
    result: dict = {"mode": "sharing", "size": size, "warm_up_seconds": round(warm_up_s, 2)}
    for name, swept in SHARING_SWEEPS.items():
        if names and name not in names:
            continue
        seconds, passes = [], []
        for index, values in enumerate(itertools.product(*swept.values())):
            run_name = f"{name}_single_{index}"
            settings = [f"{k}={v}" for k, v in zip(swept, values, strict=True)]
            run_dir = workdir / f"runs/{run_name}"
            args = [*base, *settings, f"mlflow.run_name={run_name}", f"hydra.run.dir={run_dir}"]
            seconds.append(run_seconds(args, workdir))
            passes.append(_metric(workdir, run_name, "forward_passes"))
        sweep_name = f"{name}_sweep"
        sweep = ["-m", *base, *(f"{k}={','.join(v)}" for k, v in swept.items())]
        sweep_s = run_seconds(
            [*sweep, f"hydra.sweep.dir={workdir / 'sweeps' / sweep_name}"], workdir
        )
        sweep_passes = _metric(workdir, sweep_name, "forward_passes")
        reused = _metric(workdir, sweep_name, "forward_passes_reused")
        mean_single = sum(passes) / len(passes)
        result[name] = {
            "settings": len(passes),
            "single_seconds": [round(x, 2) for x in seconds],
            "singles_sum_seconds": round(sum(seconds), 2),
            "single_forward_passes": passes,
            "sweep_seconds": round(sweep_s, 2),
            "sweep_forward_passes": sweep_passes,
            "sweep_forward_passes_reused": reused,
            "forward_passes_ratio": round(sweep_passes / mean_single, 3),
            "sweep_cost_ratio": round(sweep_s / sum(seconds), 3),
        }
    result["load_average_before"] = load_before
    result["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    return result


def _run(args: argparse.Namespace, workdir: Path) -> dict:
    if args.mode == "sharing":
        return measure_sharing(args.size, workdir, args.override, args.sweep)
    return measure(args.k, args.size, workdir, args.repeats, args.override)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("reuse", "sharing"), default="reuse")
    parser.add_argument(
        "--sweep",
        action="append",
        choices=sorted(SHARING_SWEEPS),
        help="--mode sharing: only these",
    )
    parser.add_argument("--k", type=int, default=4, help="number of settings (a grid)")
    parser.add_argument("--size", choices=("demo", "tiny"), default="demo", help="demo.size")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--override", action="append", default=[], help="KEY=VALUE for all")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: temporary)")
    parser.add_argument("--json", type=Path, help="also write the result to this file")
    args = parser.parse_args()
    try:
        grid(args.k)
    except ValueError as error:
        parser.error(str(error))
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = _run(args, args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
            result = _run(args, Path(tmp))
    if args.mode == "sharing":
        for name in [n for n in SHARING_SWEEPS if n in result]:
            for key, value in result[name].items():
                print(f"{name}.{key:<28}  {value}")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return result
    for key in ("singles_sum_seconds", "sweep_seconds", "sweep_reuse_ratio"):
        print(f"{key:<20}  {result[key]}")
    print(f"{'single_seconds':<20}  {result['single_seconds']}")
    print(f"{'load average':<20}  {result['load_average_before']} / {result['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

"""The demo's training run in MLflow: logged as a fastMONAI patch training run is, and
recognised again (by experiment, state and the model's checksum tag) so it is logged once."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from evalharness.track import tracking

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from evalharness.demo.spec import DemoSpec

RUN_NAME = "demo-training"
KIND_TAG = "evalharness.kind"
KIND = "demo-training"
MODEL_SHA_TAG = "evalharness.demo.model_sha256"


def run_is_usable(client: MlflowClient, run_id: str | None, experiment: str, sha256: str) -> bool:
    """Whether `run_id` is a FINISHED, active run of `experiment` holding the model `sha256`."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        run = client.get_run(run_id)
        experiment_name = client.get_experiment(run.info.experiment_id).name
    except MlflowException:
        return False
    return (
        run.info.lifecycle_stage == "active"
        and run.info.status == "FINISHED"
        and experiment_name == experiment
        and run.data.tags.get(MODEL_SHA_TAG) == sha256
    )


def log_training_run(
    client: MlflowClient,
    tracking_uri: str,
    build_dir: Path,
    model_sha256: str,
    experiment: str,
    spec: DemoSpec,
) -> str:
    """Log the built demo in `build_dir` as a FINISHED training run laid out as fastMONAI's
    (module doc of `evalharness.demo.build`); its run id. A failure marks the run FAILED."""
    from mlflow.entities import Metric, Param, RunTag

    experiment_id = tracking.experiment_id(client, tracking_uri, experiment)
    data_root = build_dir / "data"
    tags = {
        KIND_TAG: KIND,
        MODEL_SHA_TAG: model_sha256,
        "evalharness.demo.data_root": str(data_root),
        "evalharness.demo.split_file": str(data_root / "split.csv"),
        "evalharness.demo.spec": json.dumps(spec.to_dict()),
    }
    run = client.create_run(experiment_id, run_name=RUN_NAME, tags=tags)
    run_id = run.info.run_id
    try:
        config = json.loads((build_dir / "patch_config.json").read_text())
        params = {f"patch_{k}": v for k, v in config.items()}
        params |= {
            "target_spacing": config["target_spacing"],
            "apply_reorder": config["apply_reorder"],
            "model_arch": "monai.networks.nets.UNet",
            "model_channels": list(spec.channels),
            "model_strides": list(spec.strides),
            "model_num_res_units": 1,
            "loss": "DiceCELoss(softmax=True, to_onehot_y=True)",
            "optimizer": "Adam",
            "learning_rate": spec.learning_rate,
            "epochs": spec.epochs,
            "batch_size": spec.batch_size,
            "n_cases": spec.n_cases,
            "n_test": spec.n_test,
        }
        history = json.loads((build_dir / "train_history.json").read_text())
        now_ms = int(time.time() * 1000)
        metrics = [
            Metric(name, float(value), now_ms, step)
            for name, values in history.items()
            for step, value in enumerate(values)
        ]
        client.log_batch(
            run_id,
            params=[Param(k, str(v)) for k, v in params.items()],
            tags=[RunTag("mlflow.source.name", "evalharness.demo")],
        )
        for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
            client.log_batch(run_id, metrics=metrics[start : start + 1000])
        client.log_artifact(run_id, str(build_dir / "model" / "best_learner.pkl"), "model")
        for name in ("patch_config.pkl", "patch_config.json"):
            client.log_artifact(run_id, str(build_dir / name))
        client.log_artifact(run_id, str(data_root / "split.csv"))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id

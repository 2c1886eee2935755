"""A sweep's setting that already finished outside the sweep becomes a child of its parent
(real local stores): the finished run's params, metrics, tags, dataset input and artifacts
(not its predictions), a link back to it; a child of this very parent is used as it is."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from mlflow.data import from_pandas
from mlflow.entities import DatasetInput, InputTag

from evalharness.track import tracking
from evalharness.track.reuse import REUSED_FROM_TAG, finished_setting
from evalharness.track.summaries import headline_first

NOTE = "mlflow.note.content"


def finished_run(client, experiment: str, folder: Path, parent: str | None = None) -> str:
    """An evaluation run as the harness leaves one: params, metrics, a note, artifacts."""
    tags = {"evalharness.kind": "evaluation", "evalharness.config_hash": "h1", NOTE: "- DSC"}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run_id = tracking.create_run(client, experiment, "demo-training", tags)
    tracking.log_params(client, run_id, {"patch.overlap": "null", "effective.overlap": 0.5})
    metrics = {"n_cases": 4, "dsc_mean": 0.91, "hd95_mm_mean": 3.0}
    tracking.log_metrics(client, run_id, headline_first(metrics))  # as an evaluation logs them
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "per_case.csv").write_text("case,label,dsc\na,1,0.91\n")
    (folder / "plots").mkdir(exist_ok=True)
    (folder / "plots" / "metrics.png").write_bytes(b"\x89PNG")
    (folder / "predictions").mkdir(exist_ok=True)
    (folder / "predictions" / "a_pred.nii.gz").write_bytes(b"x")
    tracking.log_file(client, run_id, folder / "per_case.csv")
    client.log_artifacts(run_id, str(folder / "plots"), "plots")
    client.log_artifacts(run_id, str(folder / "predictions"), "predictions")
    dataset = from_pandas(pd.DataFrame({"case": ["a"]}), name="demo/all")
    context = [InputTag("mlflow.data.context", "evaluation")]
    client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(), context)])
    tracking.finish(client, run_id, "FINISHED")
    return run_id


def test_a_setting_finished_outside_the_sweep_becomes_a_child(sqlite_uri, tmp_path) -> None:
    client, experiment = tracking.open_experiment(sqlite_uri, "e")
    source = finished_run(client, experiment, tmp_path / "source")
    parent = tracking.create_run(client, experiment, "sweep", {"evalharness.kind": "sweep"})
    tags = {"evalharness.kind": "evaluation", "mlflow.parentRunId": parent}
    finished = [client.get_run(source)]
    child = finished_setting(client, finished, experiment, "overlap=0.5", tags, tmp_path / "s")
    assert child != source
    run = client.get_run(child)
    assert run.info.status == "FINISHED" and run.info.run_name == "overlap=0.5"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags[REUSED_FROM_TAG] == source
    assert run.data.tags["evalharness.config_hash"] == "h1"  # the finished run's own tags
    note = run.data.tags[NOTE].splitlines()
    assert note[0] == (
        f"- Reused from run [demo-training ({source[:8]})](#/experiments/{experiment}/runs/"
        f"{source}): this setting had already finished there"
    )
    assert note[1] == "- DSC"
    assert run.data.metrics == client.get_run(source).data.metrics
    assert run.data.metrics["dsc_mean"] == 0.91 and "headline/dsc_mean" in run.data.metrics
    assert run.data.params == {"patch.overlap": "null", "effective.overlap": "0.5"}
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["demo/all"]
    paths = {a.path for a in client.list_artifacts(child)}
    assert paths == {"per_case.csv", "plots"}  # not the saved predictions
    assert [a.path for a in client.list_artifacts(child, "plots")] == ["plots/metrics.png"]
    # a copy of a copy still points at the run that computed the results
    again = tracking.create_run(client, experiment, "sweep 2", {"evalharness.kind": "sweep"})
    copies = [client.get_run(child)]
    tags2 = {**tags, "mlflow.parentRunId": again}
    second = finished_setting(client, copies, experiment, "overlap=0.5", tags2, tmp_path / "t")
    assert client.get_run(second).data.tags[REUSED_FROM_TAG] == source


def test_a_child_of_this_parent_is_taken_as_it_is(sqlite_uri, tmp_path, capsys) -> None:
    client, experiment = tracking.open_experiment(sqlite_uri, "e")
    parent = tracking.create_run(client, experiment, "sweep", {"evalharness.kind": "sweep"})
    outside = finished_run(client, experiment, tmp_path / "a")
    own = finished_run(client, experiment, tmp_path / "b", parent=parent)
    finished = [client.get_run(outside), client.get_run(own)]
    tags = {"mlflow.parentRunId": parent}
    assert finished_setting(client, finished, experiment, "x", tags, tmp_path / "s") == own
    no_sweep = finished_setting(client, finished, experiment, "x", {}, tmp_path / "s")
    assert no_sweep == outside  # not in a sweep: the newest finished run, no copy
    assert len(client.search_runs([experiment])) == 3
    assert capsys.readouterr().out.count("skipped: this setting already finished") == 2

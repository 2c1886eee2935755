"""The evaluated cases as an MLflow dataset input, so the runs table's Dataset column says
what was evaluated.

The dataset is a small table (case id, image and label paths relative to the data root, split)
logged with `MlflowClient.log_inputs` (what `mlflow.log_input` does for the active run) under
the context ``evaluation``. Its digest is MLflow's hash of that table, so runs on the same cases
show the same digest whatever the settings, and no absolute path of this machine enters it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from mlflow.data.pandas_dataset import PandasDataset, from_pandas
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from evalharness.data.datasets import Case, Dataset
from evalharness.track.tracking import store_write

CONTEXT = "evaluation"
COLUMNS = ("case", "image", "label", "split")


def split_name(method: str, file_value: str | None = None) -> str:
    """What the split is called: ``test`` for the held-out part of a split (``decathlon``,
    ``sklearn``), the selected value of a split file (``data.split.value``), ``all``."""
    if method == "all":
        return "all"
    if method == "file":
        return str(file_value) if file_value not in (None, "") else "test"
    return "test"


def dataset_name(root: Path, split: str, task: str | None = None, demo: bool = False) -> str:
    """``<task>/<split>``: ``Task02_Heart/test``; the task is ``data.task``, else the data
    folder's name (``demo`` for the embedded demo)."""
    label = "demo" if demo else (task or Path(root).name or "data")
    return f"{label}/{split}"


def case_frame(cases: Sequence[Case], root: Path, split: str) -> pd.DataFrame:
    """One row per case: id, image and label paths relative to `root` (POSIX; absolute when
    outside it; label "" when the case has none), split."""
    rows = [
        {
            "case": case.case_id,
            "image": _relative(case.image, root),
            "label": _relative(case.label, root) if case.label is not None else "",
            "split": split,
        }
        for case in cases
    ]
    return pd.DataFrame(rows, columns=list(COLUMNS))


def evaluation_dataset(cases: Sequence[Case], root: Path, name: str, split: str) -> PandasDataset:
    """The cases as an `mlflow.data` pandas dataset named `name`, sourced at the data root."""
    with warnings.catch_warnings():
        # MLflow registers its local source for two schemes and warns that a path matches both
        warnings.filterwarnings("ignore", "The specified dataset source", UserWarning)
        return from_pandas(case_frame(cases, root, split), source=str(root), name=name)


def cases_dataset(
    dataset: Dataset, layout: str, task: str | None, split_value: str | None
) -> PandasDataset:
    """The evaluation split of `dataset` as a dataset input: `layout` is ``data.name``
    (``demo`` names it so), `task` ``data.task``, `split_value` ``data.split.value``."""
    split = split_name(dataset.split_method, split_value)
    name = dataset_name(dataset.root, split, task, demo=layout == "demo")
    return evaluation_dataset(dataset.cases, dataset.root, name, split)


@store_write
def log_evaluation_dataset(client: MlflowClient, run_id: str, dataset: PandasDataset) -> None:
    """Log `dataset` as the run's input with context ``evaluation``."""
    tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=CONTEXT)]
    entity = DatasetInput(dataset=dataset._to_mlflow_entity(), tags=tags)
    client.log_inputs(run_id, datasets=[entity])


def _relative(path: Path, root: Path) -> str:
    relative = os.path.relpath(path, root)
    return Path(path).as_posix() if relative.startswith("..") else Path(relative).as_posix()

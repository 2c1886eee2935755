"""List the cases of the evaluation split and the dataset's label names.

Two layouts are read: a Medical Segmentation Decathlon folder (``dataset.json`` with a
``training`` list; ``data.name`` "decathlon" or "demo") and a CSV manifest (``data.name`` "csv").
The split methods pick the test part the way training did, so a model is never scored on cases it
was trained on: "decathlon" replays MONAI's ``DecathlonDataset`` followed by scikit-learn's
``train_test_split`` without loading any image, "sklearn" applies ``train_test_split`` to the
listed cases, "file" reads the rows of a split CSV, "all" keeps every case, "held_out" keeps the
cases the training run neither trained nor validated on (the selection is passed in by the caller,
from the run's ``data/train_val_split.csv``: `evalharness.data.training_split`).

Files that do not exist are kept as cases: the evaluation records them as per-case failures, so
one bad case does not stop the others. Problems with the dataset as a whole raise ``DataError``,
bad configuration values raise ``ConfigError``.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from evalharness.config import rules
from evalharness.config.schema import DataConfig, SplitConfig
from evalharness.data.cases import Case, Dataset
from evalharness.data.nnunet_dataset import read_raw_dataset
from evalharness.errors import ConfigError, DataError

# What the training notebook ran: DecathlonDataset(..., section="training") with MONAI's defaults
# val_frac=0.2 and seed=0, then train_test_split(ds.data, test_size=0.1, random_state=42).
MONAI_VAL_FRAC = 0.2
MONAI_SEED = 0
MONAI_MAX_SEED = 2**32  # monai.utils.misc.MAX_SEED: Randomizable.set_random_state takes seed % it
DECATHLON_TEST_SIZE = 0.1
SKLEARN_TEST_SIZE = 0.2
RANDOM_STATE = 42

NIFTI_SUFFIXES = (".nii.gz", ".nii")


HeldOut = Callable[[list["Case"], Path], list["Case"]]
"""(every listed case, the dataset folder) -> the cases the training run did not use."""


def load_dataset(data_cfg: DataConfig, held_out: HeldOut | None = None) -> Dataset:
    """Read the dataset described by the ``data`` config and return its evaluation split.

    `held_out` is the selection of split method "held_out" (None: that method is unavailable).
    """
    name = data_cfg.name
    split_cfg = data_cfg.split
    method = split_cfg.method
    if method == "decathlon" and name == "csv":
        raise ConfigError(
            "data.split.method=decathlon: needs a Decathlon folder (data.name decathlon or demo), "
            "not a CSV manifest; use sklearn, file or all"
        )

    test_cases: list[Case] = []
    if name == "csv":
        manifest = _manifest_path(data_cfg)
        folder, label_names = manifest.parent, {}
        listed = None if method == "file" else _read_manifest(manifest, data_cfg)
    elif name == "nnunet":
        folder = _dataset_folder(data_cfg, "dataset.json", "an nnU-Net raw dataset folder")
        raw = read_raw_dataset(folder)
        listed, test_cases = [*raw.training, *raw.test], list(raw.test)
        label_names = raw.label_names
    else:
        folder = _decathlon_folder(data_cfg)
        listed, label_names = _read_decathlon(folder / "dataset.json")

    if method == "file":
        cases = _file_split(split_cfg, folder)
    elif method == "all":
        cases = listed
    elif method == "held_out":
        if held_out is None:
            raise ConfigError(
                "data.split.method=held_out: needs a training run (model.run_id, model.uri or "
                "model.run_name) that logged data/train_val_split.csv"
            )
        cases = held_out(listed, folder)
    elif method == "sklearn":
        cases = _test_part(listed, split_cfg, SKLEARN_TEST_SIZE)
    elif test_cases:  # nnU-Net's layout with imagesTs: its test cases are the split
        cases = test_cases
    else:
        training = [listed[i] for i in monai_training_indices(len(listed))]
        cases = _test_part(training, split_cfg, DECATHLON_TEST_SIZE)

    cases = cases[: data_cfg.limit]
    if not cases:
        raise DataError(f"data.split.method={method}: no cases in the split of {folder}")
    if data_cfg.shard is not None:
        cases = shard_cases(cases, *rules.shard("data.shard", data_cfg.shard))
    return Dataset(
        cases=tuple(cases),
        label_names=_label_names(label_names, data_cfg.labels),
        root=folder,
        split_method=method,
    )


def monai_training_indices(n: int) -> list[int]:
    """Indices, in order, that ``DecathlonDataset(section="training")`` keeps of `n` listed cases.

    Replays ``DecathlonDataset._split_datalist`` with its defaults (val_frac=0.2, seed=0): a
    ``np.random.RandomState(seed)`` shuffles ``np.arange(n)`` in place and the first
    ``int(n * val_frac)`` indices go to validation; "training" is the rest, in shuffled order.
    """
    indices = np.arange(n)
    np.random.RandomState(MONAI_SEED % MONAI_MAX_SEED).shuffle(indices)
    return indices[int(n * MONAI_VAL_FRAC) :].tolist()


def shard_cases(cases: Sequence[Case], index: int, count: int) -> list[Case]:
    """Shard `index` of `count` (``data.shard=<index>/<count>``): every `count`-th case by case
    id from the `index`-th, in split order. Sorting by id first makes the shards the same
    whatever order the split lists its cases in, so n shards are a partition of the split."""
    ranked = sorted(range(len(cases)), key=lambda i: cases[i].case_id)
    chosen = set(ranked[index::count])
    picked = [case for i, case in enumerate(cases) if i in chosen]
    if not picked:
        raise DataError(
            f"data.shard={index}/{count}: no cases in this shard (the split has {len(cases)})"
        )
    return picked


def case_id_of(path: Path) -> str:
    """File name without .nii.gz/.nii (or without its last suffix for other formats)."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def _resolve(folder: Path, value: str | os.PathLike[str]) -> Path:
    """Absolute, normalised path of `value` (relative ones against `folder`), like MONAI's."""
    return Path(os.path.normpath(folder / Path(value).expanduser()))


def _decathlon_folder(data_cfg: DataConfig) -> Path:
    """``data.root`` (joined with ``data.task`` when set), checked to hold a dataset.json."""
    return _dataset_folder(data_cfg, "dataset.json", "a Medical Segmentation Decathlon folder")


def _dataset_folder(data_cfg: DataConfig, marker: str, expected: str) -> Path:
    """``data.root`` (joined with ``data.task`` when set), checked to hold `marker`."""
    root, task = data_cfg.root, data_cfg.task
    if not root:
        raise ConfigError(f"data.root: missing (expected {expected})")
    folder = _resolve(Path.cwd(), Path(root) / task if task else root)
    if not (folder / marker).is_file():
        where = f"data.root={root}" + (f", data.task={task}" if task else "")
        raise DataError(f"{where}: no {marker} in {folder} (expected {expected})")
    return folder


def _read_decathlon(path: Path) -> tuple[list[Case], dict[int, str]]:
    """Cases of dataset.json's "training" list (file order) and its "labels" names."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # JSON errors, too deep
        raise DataError(f"{path}: unreadable dataset.json ({exc})".replace("\n", " ")) from exc
    training = content.get("training") if isinstance(content, dict) else None
    if not isinstance(training, list) or not training:
        raise DataError(f'{path}: expected a non-empty "training" list of image/label entries')
    cases = []
    for i, entry in enumerate(training):
        image = entry.get("image") if isinstance(entry, dict) else None
        label = entry.get("label") if isinstance(entry, dict) else None
        if not isinstance(image, str) or not isinstance(label, str | None):
            raise DataError(f'{path}: training[{i}] must have an "image" path (and "label" path)')
        image_path = _resolve(path.parent, image)
        label_path = _resolve(path.parent, label) if label else None
        cases.append(Case(case_id_of(image_path), image_path, label_path))
    _check_unique(cases, str(path))
    labels = content.get("labels") or {}
    if not isinstance(labels, Mapping):
        raise DataError(f'{path}: "labels" must map label values to names')
    return cases, _int_keys(labels, f'{path}: "labels"', DataError)


def _manifest_path(data_cfg: DataConfig) -> Path:
    """``data.manifest``, relative to ``data.root`` when set, checked to exist."""
    manifest, root = data_cfg.manifest, data_cfg.root
    if not manifest:
        raise ConfigError("data.manifest: missing (expected a CSV of image/label paths)")
    path = _resolve(_resolve(Path.cwd(), root) if root else Path.cwd(), manifest)
    if not path.is_file():
        raise DataError(f"data.manifest={manifest}: {path} not found (expected a CSV file)")
    return path


def _read_manifest(path: Path, data_cfg: DataConfig) -> list[Case]:
    """Cases of a CSV manifest; paths relative to its folder; no label column means no labels."""
    image_col = data_cfg.image_column or "image"
    label_col = data_cfg.label_column
    case_col = data_cfg.case_column
    table = _read_csv(path, "data.manifest")
    if table.empty:
        raise DataError(f"data.manifest={path}: no rows (expected one row per case)")
    required = {"data.image_column": image_col, "data.label_column": label_col}
    required["data.case_column"] = case_col
    for key, column in required.items():
        if column and column not in table.columns:
            raise DataError(_missing_column(path, "data.manifest", column, key, table))
    source = f"data.manifest={path}"
    cases = _cases_from_rows(table, path.parent, source, image_col, label_col or "label", case_col)
    _check_unique(cases, source)
    return cases


def _file_split(split_cfg: SplitConfig, folder: Path) -> list[Case]:
    """Cases of the split CSV rows whose ``column`` equals ``value`` (default split == test)."""
    file = split_cfg.file
    if not file:
        raise ConfigError("data.split.file: missing (expected a CSV with a split column)")
    path = _resolve(folder, file)
    if not path.is_file():
        raise DataError(
            f"data.split.file={file}: {path} not found (expected a CSV with columns image, "
            "label, split)"
        )
    column = split_cfg.column or "split"
    value = split_cfg.value
    value = "test" if value is None else str(value)
    table = _read_csv(path, "data.split.file")
    for col, why in (("image", "the image paths"), (column, "data.split.column")):
        if col not in table.columns:
            raise DataError(_missing_column(path, "data.split.file", col, why, table))
    source = f"data.split.file={path}"
    selected = table[table[column].str.strip() == value]
    cases = _cases_from_rows(selected, folder, source, "image", "label")
    _check_unique(cases, source)
    return cases


def _read_csv(path: Path, key: str) -> pd.DataFrame:
    """The CSV with every cell as a string (empty cells as ""), indexed by the line of the file
    each row starts on (blank lines and multi-line cells counted), for messages."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        lines = _record_lines(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        message = str(exc).replace("\n", " ")
        raise DataError(f"{key}={path}: unreadable CSV ({message})") from exc
    if len(lines) == len(table):
        table.index = pd.Index(lines)
    else:  # a dialect pandas reads otherwise: the row number under the header
        table.index = table.index + 2
    return table


def _record_lines(path: Path) -> list[int]:
    """The line each data record of a CSV starts on, past the header; blank lines skipped, as
    pandas skips them (none when the csv module cannot read the file)."""
    starts: list[int] = []
    with path.open(newline="") as stream:
        reader = csv.reader(stream)
        start, header_seen = 1, False
        try:
            for record in reader:
                if record and header_seen:
                    starts.append(start)
                header_seen |= bool(record)
                start = reader.line_num + 1
        except csv.Error:  # e.g. a cell over csv's field limit, which pandas reads
            return []
    return starts


def _missing_column(path: Path, key: str, column: str, why: str, table: pd.DataFrame) -> str:
    """One-line message for a missing CSV column (`why` says what it is for), listing the found."""
    found = ", ".join(map(str, table.columns)) or "none"
    return f"{key}={path}: no column {column!r} ({why}); found: {found}"


def _cases_from_rows(
    table: pd.DataFrame,
    folder: Path,
    source: str,
    image_col: str,
    label_col: str,
    case_col: str | None = None,
) -> list[Case]:
    """Cases of CSV rows (paths relative to `folder`); ids from `case_col` or image file names."""
    has_labels = label_col in table.columns
    cases = []
    for index, row in table.to_dict("index").items():
        image = row[image_col].strip()
        if not image:
            raise DataError(f"{source}: line {index} has an empty {image_col!r} cell")
        label = row[label_col].strip() if has_labels else ""
        image_path = _resolve(folder, image)
        case_id = row[case_col].strip() if case_col else case_id_of(image_path)
        cases.append(Case(case_id, image_path, _resolve(folder, label) if label else None))
    return cases


def _check_unique(cases: list[Case], source: str) -> None:
    """Refuse repeated case ids: results, tags and files are keyed by them."""
    counts = Counter(case.case_id for case in cases)
    duplicates = sorted(case_id for case_id, count in counts.items() if count > 1)
    if duplicates:
        raise DataError(f"{source}: duplicate case ids {', '.join(duplicates)} (must be unique)")


def _test_part(pool: list[Case], split_cfg: SplitConfig, default: float) -> list[Case]:
    """Test part of ``train_test_split(pool, test_size, random_state)``, in sklearn's order."""
    test_size = split_cfg.test_size
    test_size = default if test_size is None else test_size
    random_state = split_cfg.random_state
    random_state = RANDOM_STATE if random_state is None else random_state
    try:
        return train_test_split(pool, test_size=test_size, random_state=random_state)[1]
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"data.split.test_size={test_size}, data.split.random_state={random_state}: "
            f"cannot split {len(pool)} cases ({exc})".replace("\n", " ")
        ) from exc


def _label_names(from_dataset: dict[int, str], from_config: Any) -> dict[int, str]:
    """dataset.json names updated by ``data.labels``, with 0 named background if unnamed."""
    if from_config is not None and not isinstance(from_config, Mapping):
        raise ConfigError(f"data.labels={from_config!r}: expected a mapping {{int: name}}")
    names = {0: "background", **from_dataset}
    names.update(_int_keys(from_config or {}, "data.labels", ConfigError))
    return dict(sorted(names.items()))


def _int_keys(labels: Mapping[Any, Any], where: str, error: type[Exception]) -> dict[int, str]:
    """Label names keyed by int (JSON and YAML may give "1" strings)."""
    try:
        return {int(key): str(name) for key, name in labels.items()}
    except (TypeError, ValueError) as exc:
        raise error(f"{where}: label keys must be integers, got {list(labels)}") from exc

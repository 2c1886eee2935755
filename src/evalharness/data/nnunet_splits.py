"""nnU-Net's ``splits_final.json``: which cases each fold trained and validated on.

A list, one ``{"train": [...], "val": [...]}`` per fold (nnU-Net keeps it in
``nnUNet_preprocessed/<dataset>/``). For the evaluated folds it becomes the `TrainingSplit` that
the leakage check and ``data.split.method=held_out`` use, as fastMONAI's
``train_val_split.csv`` does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from evalharness.data.training_split import TrainingRow, TrainingSplit
from evalharness.errors import DataError


def read_splits(path: Path, folds: Sequence[str]) -> TrainingSplit:
    """The cases the evaluated `folds` trained ("train") and validated ("valid") on, from
    ``splits_final.json``; fold "all" trains on every case of the splits."""
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable splits ({' '.join(str(exc).split())})") from None
    if not isinstance(content, list) or not all(
        isinstance(f, dict) and isinstance(f.get("train"), list) and isinstance(f.get("val"), list)
        for f in content
    ):
        raise DataError(f'{path}: expected a list of {{"train": [...], "val": [...]}} per fold')
    roles: dict[str, str] = {}
    for fold in folds:
        if fold == "all":
            for entry in content:
                for case in (*entry["train"], *entry["val"]):
                    roles[str(case)] = "train"
            continue
        index = int(fold)
        if index >= len(content):
            raise DataError(
                f"{path}: has folds 0-{len(content) - 1}; expected fold {fold} (model.folds)"
            )
        for case in content[index]["val"]:
            roles.setdefault(str(case), "valid")
        for case in content[index]["train"]:
            roles[str(case)] = "train"  # trained on by one fold outranks validated by another
    rows = tuple(TrainingRow(role, frozenset({case}), ()) for case, role in roles.items())
    return TrainingSplit(rows, f"{path} (folds {','.join(folds)})")

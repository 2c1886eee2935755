"""The training run's own split: which cases fastMONAI trained and validated on.

fastMONAI 0.12's MLflow callback logs ``data/train_val_split.csv`` (columns ``sample_id``, the
image/label columns of its data loaders, ``is_valid``: one row per case it trained on,
``is_valid`` False, or validated on, True) and the tag ``split_version``. The paths are the
training machine's, so a case being evaluated is matched to a row in two ways:

- by case id: the file name without ``.nii.gz``/``.nii`` of the row's ``sample_id`` or
  ``image`` equals the case's id;
- by path: the last components of the row's path equal the case image's path relative to the
  dataset folder (``imagesTr/la_000.nii.gz`` matches ``/train/box/Task02/imagesTr/la_000.nii.gz``).

Either match makes the case one the training run used; a case matched neither way is not.
Pure functions on the CSV file and the case list: no MLflow.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pandas as pd

from evalharness.data.datasets import Case, case_id_of
from evalharness.errors import DataError, SourceError

ARTIFACT = "data/train_val_split.csv"
"""Where fastMONAI 0.12's MLflow callback logs the split in the training run."""
_ID_COLUMNS = ("sample_id", "image")
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


@dataclass(frozen=True)
class TrainingRow:
    """One case of the training run's split."""

    role: str  # "train" or "valid"
    case_ids: frozenset[str]  # file names without .nii.gz/.nii of its sample_id and image
    paths: tuple[tuple[str, ...], ...]  # path components of its sample_id and image


@dataclass(frozen=True)
class TrainingSplit:
    """What the training run trained and validated on, and the version it logged."""

    rows: tuple[TrainingRow, ...]
    source: str  # where it was read, for messages (run id + artifact path)
    version: str | None = None  # fastMONAI's `split_version` tag


@dataclass(frozen=True)
class SplitMatch:
    """An evaluated case found among the training run's rows."""

    case: Case
    role: str  # "train" or "valid"
    matched_by: str  # "case id and path", "case id" or "path"


def _parts(text: str) -> tuple[str, ...]:
    """Path components, any separator, without '.' and empty parts (normalised)."""
    norm = posixpath.normpath(text.strip().replace("\\", "/"))
    return tuple(part for part in PurePosixPath(norm).parts if part not in ("/", "."))


def _is_valid(value: str, source: str, line: int) -> bool:
    text = value.strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise DataError(f"{source}: line {line}: is_valid={value!r}, expected True or False")


def read_training_split(path: Path, source: str, version: str | None = None) -> TrainingSplit:
    """Parse fastMONAI's ``train_val_split.csv`` at `path` (`source` names it in errors)."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(f"{source}: unreadable CSV ({' '.join(str(exc).split())})") from exc
    columns = [c for c in _ID_COLUMNS if c in table.columns]
    if "is_valid" not in table.columns or not columns:
        found = ", ".join(map(str, table.columns)) or "none"
        raise DataError(
            f"{source}: expected columns sample_id (or image) and is_valid; found: {found}"
        )
    rows = []
    for index, record in enumerate(table.to_dict("records")):
        values = [record[c].strip() for c in columns if record[c].strip()]
        if not values:
            raise DataError(f"{source}: line {index + 2} names no case (sample_id/image empty)")
        role = "valid" if _is_valid(record["is_valid"], source, index + 2) else "train"
        case_ids = frozenset(case_id_of(Path(_parts(v)[-1])) for v in values if _parts(v))
        rows.append(TrainingRow(role, case_ids, tuple(dict.fromkeys(_parts(v) for v in values))))
    return TrainingSplit(tuple(rows), source, version)


def _relative_parts(case: Case, root: Path) -> tuple[str, ...] | None:
    try:
        return _parts(case.image.relative_to(root).as_posix())
    except ValueError:  # the image lies outside the dataset folder
        return None


def _path_matches(row: TrainingRow, relative: tuple[str, ...] | None) -> bool:
    if not relative:
        return False
    return any(len(p) >= len(relative) and p[-len(relative) :] == relative for p in row.paths)


def match_case(case: Case, root: Path, split: TrainingSplit) -> SplitMatch | None:
    """The training row of `case` (image relative to the dataset folder `root`), or None.

    A path match outranks a case-id match; among equals, a training row outranks a validation
    row (the stronger leak).
    """
    relative = _relative_parts(case, root)
    best: tuple[tuple[int, int], SplitMatch] | None = None
    for row in split.rows:
        by_id, by_path = case.case_id in row.case_ids, _path_matches(row, relative)
        if not (by_id or by_path):
            continue
        how = "case id and path" if by_id and by_path else "path" if by_path else "case id"
        rank = (int(by_path), int(row.role == "train"))
        if best is None or rank > best[0]:
            best = (rank, SplitMatch(case, row.role, how))
    return None if best is None else best[1]


def used_in_training(
    cases: tuple[Case, ...] | list[Case], root: Path, split: TrainingSplit
) -> list[SplitMatch]:
    """The cases among `cases` that the training run trained or validated on, in case order."""
    found = (match_case(case, root, split) for case in cases)
    return [m for m in found if m is not None]


def held_out_cases(cases: list[Case], root: Path, split: TrainingSplit) -> list[Case]:
    """The cases the training run neither trained nor validated on, in the dataset's order."""
    used = {m.case.case_id for m in used_in_training(cases, root, split)}
    return [case for case in cases if case.case_id not in used]


def training_split_of(
    path: Path | None, run_id: str | None, version: str | None, method: str
) -> TrainingSplit | None:
    """The split a training run logged (`path`: its downloaded CSV, None when it has none).

    No file is fine, except for ``data.split.method=held_out`` on a run: an error naming it.
    """
    if path is None:
        if method == "held_out" and run_id:
            raise SourceError(
                f"data.split.method=held_out: training run '{run_id}' has no artifact "
                f"'{ARTIFACT}' (fastMONAI's MLflow callback logs it)"
            )
        return None
    return read_training_split(path, f"runs:/{run_id}/{ARTIFACT}", version)

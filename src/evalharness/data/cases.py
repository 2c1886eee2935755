"""The cases of an evaluation split and the split itself: what every data layout produces."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    """One case to evaluate; its files may not exist (the evaluation then records a failure)."""

    case_id: str  # image file name without .nii/.nii.gz, unique within the dataset
    image: Path  # absolute
    label: Path | None  # absolute; None when the split has no labels (metrics are skipped)
    channels: tuple[Path, ...] = ()  # one file per channel (nnU-Net's layout); () = `image` only


@dataclass(frozen=True)
class Dataset:
    """The evaluation split: its cases in split order, label names and where it came from."""

    cases: tuple[Case, ...]
    label_names: dict[int, str]  # background included
    root: Path  # the folder relative paths resolve against (Decathlon folder or manifest's)
    split_method: str

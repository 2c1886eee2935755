"""nnU-Net's raw dataset layout and its ``splits_final.json``.

A raw dataset folder holds ``dataset.json`` (``channel_names``, ``labels``, ``file_ending``),
``imagesTr/<case>_0000<ending>`` (one file per channel, ``_0001``, ...), ``labelsTr/<case><ending>``
and, optionally, ``imagesTs/`` and ``labelsTs/``. Every case must have exactly one file per
channel of ``channel_names``: a missing or an extra channel file is a `DataError` naming it.
Its ``splits_final.json`` is read by `data.nnunet_splits`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from evalharness.data.cases import Case
from evalharness.errors import DataError

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class RawDataset:
    """The cases of a raw dataset folder: training (imagesTr) and test (imagesTs) ones."""

    folder: Path
    training: tuple[Case, ...]
    test: tuple[Case, ...]
    label_names: dict[int, str]
    channel_names: dict[int, str]


def read_dataset_json(path: Path) -> dict:
    """A raw dataset's ``dataset.json`` with the keys the layout needs."""
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable dataset.json ({' '.join(str(exc).split())})") from None
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a JSON object")
    for key, kind in (("channel_names", Mapping), ("labels", Mapping), ("file_ending", str)):
        if not isinstance(content.get(key), kind) or not content.get(key):
            raise DataError(f'{path}: expected "{key}" (nnU-Net\'s raw dataset.json)')
    return content


def _label_names(labels: Mapping, path: Path) -> dict[int, str]:
    """nnU-Net's ``labels`` (name -> value; a region: a list of values) as value -> name."""
    names: dict[int, str] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise DataError(f'{path}: label "{name}" is a region {value}; expected plain labels')
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f'{path}: label "{name}" has value {value!r}; expected an integer')
        names[value] = str(name)
    return names


def _cases(folder: Path, images: str, labels: str, ending: str, channels: int) -> list[Case]:
    """The cases of ``images`` (one file per channel), each with its label file if present."""
    image_dir = folder / images
    if not image_dir.is_dir():
        return []
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(image_dir.iterdir()):
        if not path.name.endswith(ending):
            continue
        match = _CHANNEL.match(path.name[: -len(ending)])
        if match is None:
            raise DataError(f"{path}: expected <case>_<4-digit channel>{ending}")
        found.setdefault(match["case"], {})[int(match["channel"])] = path.resolve()
    cases = []
    for case_id, files in found.items():
        expected = set(range(channels))
        missing, extra = sorted(expected - set(files)), sorted(set(files) - expected)
        if missing:
            name = image_dir / f"{case_id}_{missing[0]:04d}{ending}"
            raise DataError(
                f"{name}: missing (dataset.json channel_names lists {channels} channel(s))"
            )
        if extra:
            raise DataError(
                f"{files[extra[0]]}: an extra channel file (dataset.json channel_names lists "
                f"{channels} channel(s))"
            )
        label = folder / labels / f"{case_id}{ending}"
        ordered = tuple(files[c] for c in range(channels))
        label_path = label.resolve() if label.is_file() else None
        cases.append(Case(case_id, ordered[0], label_path, ordered))
    return cases


def read_raw_dataset(folder: Path) -> RawDataset:
    """The training and test cases of the raw dataset `folder`."""
    path = folder / "dataset.json"
    content = read_dataset_json(path)
    ending = content["file_ending"]
    channel_names = {int(k): str(v) for k, v in content["channel_names"].items()}
    n = len(channel_names)
    training = _cases(folder, "imagesTr", "labelsTr", ending, n)
    test = _cases(folder, "imagesTs", "labelsTs", ending, n)
    if not training and not test:
        raise DataError(f"{folder}: no imagesTr/ or imagesTs/ cases ending in {ending}")
    return RawDataset(
        folder, tuple(training), tuple(test), _label_names(content["labels"], path), channel_names
    )

"""Train/test leakage: evaluated cases that the training run trained or validated on.

A model scored on cases it saw in training looks better than it is. Whenever the training run
logged its split (fastMONAI's ``data/train_val_split.csv``), every evaluated case is matched
against it (`evalharness.data.training_split` says how) and each match is an error-class
`Mismatch` (scope ``"split"``, key ``"leakage"``, ``training`` = ``"train"`` or ``"valid"``,
``evaluation`` = how it matched). Pure functions: no MLflow, no files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from evalharness.checks.mismatches import LEAKAGE_KEY, SPLIT_SCOPE, Mismatch
from evalharness.data.datasets import Case
from evalharness.data.training_split import ARTIFACT, TrainingSplit, used_in_training

_USED = {"train": "trained on", "valid": "validated on"}


def leakage_findings(cases: Sequence[Case], root: Path, split: TrainingSplit) -> list[Mismatch]:
    """One error per case of `cases` (dataset folder `root`) that the training run used."""
    matches = used_in_training(cases, root, split)
    return [
        Mismatch(
            SPLIT_SCOPE,
            LEAKAGE_KEY,
            m.role,
            m.matched_by,
            "error",
            f"the training run {_USED[m.role]} this case (matched by {m.matched_by} in "
            f"{ARTIFACT}): its scores are not a test result",
            case=m.case.case_id,
        )
        for m in matches
    ]


def held_out_line(n_cases: int, run_id: str | None, version: str | None) -> str:
    """What data.split.method=held_out prints: how many cases, from which split_version."""
    return (
        f"held-out split: {n_cases} case(s) that training run {run_id} neither trained nor "
        f"validated on (split_version {version or 'not tagged'})"
    )

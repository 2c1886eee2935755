"""Train/test leakage: evaluated cases that the training run trained or validated on.

A model scored on cases it saw in training looks better than it is. Whenever the training run
logged its split (fastMONAI's ``data/train_val_split.csv``), every evaluated case is matched
against it (`evalharness.data.training_split` says how) and each match is an error-class
`Mismatch` (scope ``"split"``, key ``"leakage"``, ``training`` = ``"train"`` or ``"valid"``,
``evaluation`` = how it matched). Pure functions: no MLflow, no files.
"""

from __future__ import annotations

from collections.abc import Sequence

from evalharness.checks.mismatches import LEAKAGE_KEY, SPLIT_SCOPE, Mismatch
from evalharness.data.training_split import SplitMatch

_USED = {"train": "trained on", "valid": "validated on"}


def leakage_findings(matches: Sequence[SplitMatch], source: str) -> list[Mismatch]:
    """One error per evaluated case that the training run used (`source`: its split file)."""
    return [
        Mismatch(
            SPLIT_SCOPE,
            LEAKAGE_KEY,
            m.role,
            m.matched_by,
            "error",
            f"the training run {_USED[m.role]} this case (matched by {m.matched_by} in {source}): "
            "its scores are not a test result",
            case=m.case.case_id,
        )
        for m in matches
    ]

"""A model family that runs its own inference per case (nnU-Net runs nnU-Net's code).

The harness does the rest for it (cases, scoring, checks, sharing, tracking): the case loop
asks the family to load and predict a case, the sweep cache keys its inputs and patch outputs
by what the family says decides them.
"""

from __future__ import annotations

from typing import Protocol

from evalharness.data.cases import Case
from evalharness.predict.patch_outputs import ForwardCounts, OutputStore
from evalharness.predict.pipeline import CaseInputs, CasePrediction
from evalharness.predict.preprocess import PreprocessSettings


class ModelFamily(Protocol):
    """A model family that preprocesses and predicts its own way (nnU-Net runs its own code);
    the harness does the rest (cases, scoring, checks, sharing, tracking)."""

    name: str
    combine_rule: str  # how mirrors and ensemble members are combined, for the run's tags

    def load_inputs(self, case: Case, settings: PreprocessSettings) -> CaseInputs: ...

    def inputs_key(self) -> str: ...  # what decides `load_inputs` besides case and settings

    def forward_key(self, model_key: str) -> str: ...  # what decides its patch outputs

    def predict(
        self,
        inputs: CaseInputs,
        keep_probabilities: bool,
        outputs: OutputStore | None,
        counts: ForwardCounts | None,
    ) -> CasePrediction: ...

    def tags(self) -> dict[str, str]: ...

"""An ensemble of networks whose per-patch class probabilities are averaged before decoding.

As fastMONAI's `patch_inference` with a list of models and nnU-Net's fold ensembles do: each
member runs on the same batch of patches, its logits are activated (softmax, or sigmoid for one
channel), and the probabilities are averaged with equal weights. The sliding window
(`predict.sliding_window`) runs the members one after another on each batch, so only one
member's activations are on the device at a time; all members' weights are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def activate(logits: torch.Tensor) -> torch.Tensor:
    """float32 class probabilities of logits [B, K, ...]: sigmoid for K = 1, else softmax."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


class Ensemble(torch.nn.Module):
    """Networks with the same inputs and outputs, evaluated together.

    `forward` returns averaged *probabilities* [B, K, ...] (not logits); the sliding window
    does not call it but averages the members itself, activation included (`members_of`).
    """

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("an Ensemble needs at least two members")
        self.members = torch.nn.ModuleList(members)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        total = None
        for member in self.members:
            probs = activate(member(batch))
            total = probs if total is None else total.add_(probs)
        return total.div_(len(self.members))


def members_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The networks whose probabilities are averaged: an Ensemble's members, else `model`."""
    return list(model.members) if isinstance(model, Ensemble) else [model]

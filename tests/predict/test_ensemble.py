"""Ensembles average their members' per-patch probabilities (not logits) before decoding."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from evalharness.predict.ensemble import Ensemble, activate
from evalharness.predict.sliding_window import _flip_probs, sliding_window_probs


def conv(seed: int, channels: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Conv3d(1, channels, 3, padding=1).eval()


def by_hand(models: list[torch.nn.Module], batch: torch.Tensor) -> torch.Tensor:
    """Each member's softmax (sigmoid for one channel), averaged."""
    with torch.no_grad():
        outputs = [m(batch) for m in models]
    if outputs[0].shape[1] == 1:
        return sum(torch.sigmoid(o) for o in outputs) / len(outputs)
    return sum(torch.softmax(o, dim=1) for o in outputs) / len(outputs)


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_patch_probabilities_are_the_members_probabilities_averaged(channels: int) -> None:
    members = [conv(0, channels), conv(1, channels), conv(2, channels)]
    batch = torch.randn(2, 1, 8, 6, 4) * 3
    with torch.inference_mode():
        probs, n_classes = _flip_probs(Ensemble(members), batch, (), nullcontext())
    expected = by_hand(members, batch)
    assert n_classes == channels
    # two classes: only class 1's probability is blended (class 0's is 1 minus it)
    assert torch.allclose(probs, expected[:, 1:] if channels == 2 else expected, atol=1e-6)
    with torch.no_grad():
        mean_logits = sum(m(batch) for m in members) / len(members)
    from_logits = activate(mean_logits)
    assert not torch.allclose(expected, from_logits, atol=1e-3)  # the test can tell the two apart


def test_flips_and_members_are_averaged_together() -> None:
    members = [conv(3, 2), conv(4, 2)]
    batch = torch.randn(1, 1, 6, 6, 6)
    flips = [(), (0,)]
    with torch.inference_mode():
        per_flip = [_flip_probs(Ensemble(members), batch, a, nullcontext())[0] for a in flips]
    probs = sum(per_flip) / len(flips)  # the window averages the flips (`_Forwards.probs`)
    flipped = by_hand(members, batch.flip(2)).flip(2)
    expected = (by_hand(members, batch) + flipped) / 2
    assert torch.allclose(probs, expected[:, 1:], atol=1e-6)


@pytest.mark.parametrize("aggregation", ["hann", "crop"])
def test_sliding_window_of_an_ensemble_averages_the_members_windows(aggregation: str) -> None:
    """Blending is linear, so blending averaged patches = averaging the blended volumes."""
    members = [conv(5, 3), conv(6, 3)]
    image = torch.randn(1, 14, 11, 9)
    options = dict(
        patch_size_vox=(8, 8, 8),
        overlap=0.5,
        aggregation=aggregation,
        batch_size=3,
        device=torch.device("cpu"),
    )
    ensemble = sliding_window_probs(Ensemble(members).eval(), image, **options)
    each = [sliding_window_probs(m, image, **options) for m in members]
    assert torch.allclose(ensemble, (each[0] + each[1]) / 2, atol=1e-6)


def test_forward_returns_averaged_probabilities() -> None:
    members = [conv(7, 3), conv(8, 3)]
    batch = torch.randn(2, 1, 5, 5, 5)
    with torch.no_grad():
        assert torch.allclose(Ensemble(members)(batch), by_hand(members, batch), atol=1e-6)
    with pytest.raises(ValueError, match="at least two"):
        Ensemble(members[:1])

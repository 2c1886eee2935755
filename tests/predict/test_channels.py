"""The model's channels, found by one forward pass of a zero patch (`predict.channels`)."""

from __future__ import annotations

import pytest
import torch

from evalharness.errors import ConfigError
from evalharness.predict.channels import probe_channels

CPU = torch.device("cpu")


def test_input_and_output_channels_come_from_the_model() -> None:
    model = torch.nn.Conv3d(2, 3, 3, padding=1).eval()
    assert probe_channels(model, (8, 8, 8), CPU) == (2, 3)


def test_a_model_that_cannot_keep_the_patch_size_is_a_config_error() -> None:
    shrinking = torch.nn.Conv3d(1, 2, 3).eval()  # no padding: 8 -> 6
    with pytest.raises(ConfigError, match=r"patch.size=\[8, 8, 8\]: the model returns \[6, 6, 6\]"):
        probe_channels(shrinking, (8, 8, 8), CPU)
    pooled = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 1), torch.nn.MaxPool3d(4)).eval()
    with pytest.raises(ConfigError, match=r"patch.size=\[2, 2, 2\]: the model cannot run"):
        probe_channels(pooled, (2, 2, 2), CPU)

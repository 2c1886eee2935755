"""The model's input and output channels, found by running it once on a zero patch before any
case: what the evaluation checks the data and the training configuration against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evalharness.errors import ConfigError


def probe_channels(
    model: torch.nn.Module, patch_size_vox: Sequence[int], device: torch.device
) -> tuple[int, int]:
    """(input, output) channels of `model`, found by one forward pass of a zero patch.

    Also proves the model runs at this patch size before any case is touched.
    """
    in_channels = next(
        (int(m.in_channels) for m in model.modules() if hasattr(m, "in_channels")), 1
    )
    patch = torch.zeros((1, in_channels, *patch_size_vox), device=device)
    try:
        with torch.inference_mode():
            output = model(patch)
    except RuntimeError as error:
        message = " ".join(str(error).split())[:300]
        raise ConfigError(
            f"patch.size={list(patch_size_vox)}: the model cannot run on patches of this size "
            f"({message})"
        ) from error
    if isinstance(output, (tuple, list)):
        output = output[0]
    if output.shape[2:] != patch.shape[2:]:
        raise ConfigError(
            f"patch.size={list(patch_size_vox)}: the model returns {list(output.shape[2:])} "
            "for this patch size (expected the same spatial size)"
        )
    return in_channels, int(output.shape[1])

"""Build an object from a ``_target_`` mapping, as Hydra's ``instantiate`` does for ``model.arch``.

``{"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, ...}`` imports the dotted name and
calls it with the other keys; nested mappings with their own ``_target_`` are built first, and
lists stay lists (Hydra's ``_convert_="all"``). Kept here, not taken from Hydra, so that below
the shell nothing depends on Hydra.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

TARGET_KEY = "_target_"


def locate(dotted: str) -> Any:
    """The object named by ``package.module.attribute`` (the longest importable module wins)."""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(f"cannot import {dotted!r}")


def instantiate(spec: Any) -> Any:
    """`spec` with every ``_target_`` mapping replaced by the object it builds."""
    if isinstance(spec, Mapping):
        values = {key: instantiate(value) for key, value in spec.items() if key != TARGET_KEY}
        if TARGET_KEY not in spec:
            return values
        return locate(str(spec[TARGET_KEY]))(**values)
    if isinstance(spec, (list, tuple)):
        return [instantiate(value) for value in spec]
    return spec

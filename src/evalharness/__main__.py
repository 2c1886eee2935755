"""Command line: ``python -m evalharness [overrides]`` (``-m`` for a sweep)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from evalharness.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> int:
    """Evaluate one configuration; in a sweep, report the exit code instead of exiting."""
    from evalharness.run import evaluate

    hydra_cfg = HydraConfig.get()
    code = evaluate(cfg, Path(hydra_cfg.runtime.output_dir)).code
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return code
    if code:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()

"""Command line: ``python -m evalharness [overrides]`` (``-m`` for a sweep)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from evalharness.config.schema import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Any:
    """Evaluate one configuration; in a sweep, return the outcome to the sweep callback."""
    from evalharness.evaluation.run import evaluate

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        from evalharness.sweep.callback import evaluate_job

        return evaluate_job(cfg, hydra_cfg)
    code = evaluate(cfg, Path(hydra_cfg.runtime.output_dir)).code
    if code:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()

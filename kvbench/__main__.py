"""``python -m kvbench [group=option ...] [key=value ...]``: a thin Hydra wrapper around ``kvbench.runner.run``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> Any:
    from kvbench.errors import UsageError  # imported here so that --help answers without loading torch
    from kvbench.runner import run

    try:
        metrics = run(cfg)
        if "score" not in metrics:  # budget=[...]: {budget: metrics}
            return {budget: m["score"] for budget, m in metrics.items()}
        return metrics["score"]
    except UsageError as err:
        print(f"kvbench: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

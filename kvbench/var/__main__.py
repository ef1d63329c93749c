"""``python -m kvbench.var model=kvbench-tiny-var task=var_class method=hack budget=0.3``: a thin Hydra main over
``kvbench.var.run.run`` (the same ``conf/`` tree as ``python -m kvbench``)."""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from kvbench.cli import CONF_DIR


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> Any:
    from kvbench.errors import UsageError
    from kvbench.var.run import report, run

    try:
        metrics = run(cfg)
    except UsageError as err:
        print(f"kvbench.var: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(report(metrics))
    return metrics["score"]


if __name__ == "__main__":
    main()

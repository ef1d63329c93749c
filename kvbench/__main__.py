"""``python -m kvbench [group=option ...] [key=value ...]``: a thin Hydra wrapper around ``kvbench.runner.run``."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import hydra
from omegaconf import DictConfig

from kvbench.cli import CONF_DIR as CONF_PATH
from kvbench.cli import GROUPS, unknown_option

CONF_DIR = str(CONF_PATH)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> Any:
    # imported here so that --help and every usage error answer without loading torch
    from hydra.core.hydra_config import HydraConfig

    from kvbench.errors import UsageError
    from kvbench.runfiles import FULL_ERRNOS
    from kvbench.validate import check_config

    warnings.formatwarning = one_line_warning
    try:
        if cfg.model.get("family") == "var":  # next-scale image generation: kvbench.var checks its own keys
            from kvbench.var.run import report
            from kvbench.var.run import run as run_var

            var_metrics = run_var(cfg)
            print(report(var_metrics))
            return var_metrics["score"]
        check_config(cfg)  # every top-level key, before torch, transformers or any data is loaded
        from kvbench.runner import run

        metrics = run(cfg, overrides=job_overrides(HydraConfig.get()))  # methods=[...] composes with them
        if "score" not in metrics:  # budget=[...]: {budget: metrics}; methods=[...]: {(method, budget): metrics}
            return {key: m["score"] for key, m in metrics.items()}
        return metrics["score"]
    except UsageError as err:
        print(f"kvbench: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"kvbench: interrupted; every answer scored so far is kept under {cfg.paths.results}: rerun the same "
              "command to resume", file=sys.stderr)
        sys.exit(130)
    except OSError as err:
        if err.errno not in FULL_ERRNOS:
            raise
        print(f"kvbench: error: no space left on the device ({err}); free some space and rerun the same command: "
              "the answers already written are kept", file=sys.stderr)
        sys.exit(2)


def job_overrides(hydra_cfg: Any) -> list[str]:
    """The job's overrides, with the config search path it was composed with (``hydra.searchpath``)."""
    searchpath = [o for o in hydra_cfg.overrides.hydra if o.lstrip("+").startswith("hydra.searchpath=")]
    return [*searchpath, *hydra_cfg.overrides.task]


def one_line_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> str:
    """Warnings as one ``kvbench: warning: ...`` line (not Python's file:line and source line)."""
    return f"kvbench: warning: {message}\n"


if __name__ == "__main__":
    if message := unknown_option(sys.argv[1:], CONF_DIR, GROUPS):
        print(f"kvbench: error: {message}", file=sys.stderr)
        sys.exit(2)
    main()

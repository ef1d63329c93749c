"""Experiment loggers, the ``logger=`` config group (``conf/logger/``): ``none`` (default) or ``wandb``.

Local files (config.yaml, predictions.jsonl, metrics.json, the report's tables and figures) are always written; a
logger only mirrors them to a tracking service. Logging never fails or blocks a run: wandb runs offline by default
(``wandb sync <dir>/wandb/offline-run-*`` uploads later; each offline run prints its directory and that command),
online initialisation has a short timeout, and any error becomes a warning.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:  # annotations only: kvbench.validate reads LOGGERS without loading pandas
    import pandas as pd

LOGGERS = ("none", "wandb")


def _settings(node: Any) -> dict[str, Any]:
    if node is None:
        return {"name": "none"}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)


def _numbers(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flattened numeric entries (``score/exact_match``, ``kv_bytes_kept``, ...) for a run summary."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            out.update(_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = v
    return out


class WandbLogger:
    """Weights & Biases, offline unless ``mode=online``; every failure is a warning (``wandb`` is optional).

    Settings (``conf/logger/wandb.yaml``): project, entity, group, tags, mode (offline | online | disabled), dir
    (where ``wandb/`` goes), init_timeout (seconds), log_predictions (a table of the run's predictions).
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.s = settings

    def _init(self, name: str, config: dict[str, Any] | None, run_id: str | None, job_type: str) -> Any:
        import wandb

        directory = self.s.get("dir")
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
        return wandb.init(
            project=self.s.get("project", "kvbench"), entity=self.s.get("entity"), group=self.s.get("group"),
            tags=list(self.s.get("tags") or []), name=name, id=run_id, resume="allow" if run_id else None,
            job_type=job_type, config=config, dir=directory, mode=self.s.get("mode", "offline"),
            reinit="create_new",
            settings=wandb.Settings(init_timeout=float(self.s.get("init_timeout", 15)), silent=True,
                                    disable_git=True, save_code=False),
        )  # fmt: skip

    def log_run(self, config: dict[str, Any], metrics: dict[str, Any], records: list[dict[str, Any]]) -> None:
        """One wandb run per kvbench run: the resolved config, the metrics as summary, optionally predictions."""
        import wandb

        run = self._init(config.get("run_id", "kvbench"), config, metrics.get("config_hash"), "run")
        try:
            run.summary.update(_numbers(metrics))
            if self.s.get("log_predictions", True) and records:
                cols = ["id", "prediction", "references", "scores"]
                rows = [[str(r.get(c)) for c in cols] for r in records]
                run.log({"predictions": wandb.Table(columns=cols, data=rows)})
        finally:
            self._finish(run)

    def log_report(self, name: str, tables: dict[str, pd.DataFrame], figures: dict[str, Path]) -> None:
        """One wandb run holding a report's tables (wandb.Table) and figures (PNG images)."""
        import wandb

        run = self._init(name, None, None, "report")
        try:
            payload: dict[str, Any] = {k: wandb.Table(dataframe=t.reset_index()) for k, t in tables.items()}
            payload.update({k: wandb.Image(str(p)) for k, p in figures.items() if Path(p).suffix == ".png"})
            run.log(payload)
        finally:
            self._finish(run)

    def _finish(self, run: Any) -> None:
        """Finish the run; an offline one says where it is and how to upload it (stderr)."""
        offline = self.s.get("mode", "offline") == "offline"
        where = run.settings.sync_dir if offline else None
        run.finish()
        if offline:
            print(f"wandb: offline run in {where}\nwandb: upload it with: wandb sync {where}", file=sys.stderr)


def make_logger(node: Any) -> WandbLogger | None:
    """The logger a ``logger`` config node asks for (None for ``none``)."""
    from kvbench.errors import UsageError

    settings = _settings(node)
    name = settings.get("name", "none")
    if name not in LOGGERS:
        raise UsageError(f"logger={name!r}; choose one of {', '.join(LOGGERS)}")
    return WandbLogger(settings) if name == "wandb" else None


def _safely(what: str, fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except ImportError:
        warnings.warn(f"{what}: wandb is not installed (pip install 'kvbench[wandb]'); local files are written "
                      "as usual", stacklevel=3)
    except Exception as err:  # never lose a run to its logger
        warnings.warn(f"{what} failed ({type(err).__name__}: {err}); local files are written as usual",
                      stacklevel=3)


def log_run(cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """Hand a finished run to the configured logger (``cfg.logger``); a no-op for ``logger=none``."""
    logger = make_logger(cfg.get("logger"))
    if logger is None:
        return
    from kvbench.results import RunStore

    config = OmegaConf.to_container(cfg, resolve=True)
    _safely("wandb logging", lambda: logger.log_run(config, metrics, RunStore(cfg.run_dir, config).records()))

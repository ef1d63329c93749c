"""Which runs of a results root (or of a Hydra sweep) are finished, running, partial, failed, started or pending.

States of a run directory (``kvbench.results`` layout):

* ``finished``: ``metrics.json`` present.
* ``running``: not finished and a live process holds the directory's lock (``.lock``: pid, host, since, Slurm job).
* ``failed``: ``error.json`` present and no ``metrics.json``: the run raised (the runner records the exception
  type, message and traceback); rerunning resumes from the predictions already written.
* ``partial``: predictions but no metrics, no error and no live writer: killed (SIGKILL, time limit, node failure)
  or interrupted; rerunning resumes.
* ``started``: only ``config.yaml``: the run claimed its directory and no question finished yet, and nothing holds
  it now (killed while loading or before its first answer).
* ``corrupt``: a run file cannot be read (``error`` names the file, the line and the fix); listed with a warning,
  and the scan goes on with the other runs.

Status only reads: it never repairs or locks a run directory.

With a sweep (a Hydra multirun directory holding ``multirun.yaml``), every job of the sweep's grid is listed. A job
whose run directory does not exist is ``started`` when Hydra created its job directory (still loading, or it failed
before claiming its run directory: an invalid option, a model that could not be loaded) and ``pending`` otherwise
(not started yet). For Slurm sweeps (submitit) the last error line of the job's stderr is shown.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from kvbench.errors import UsageError
from kvbench.results import ASIDE, ERROR_FILE, LOCK_FILE, RunStore, existing_root, read_config, root_text
from kvbench.runfiles import CorruptRunError, read_json, read_predictions

STATES = ("finished", "running", "partial", "failed", "started", "corrupt", "pending")
COLUMNS = ["run_id", "state", "n_predictions", "n_questions", "error", "updated", "run_dir"]


def _run_state(run_dir: Path) -> dict[str, Any]:
    files = {p.name: p for p in run_dir.iterdir() if p.is_file()}
    row: dict[str, Any] = {"n_predictions": 0, "n_questions": None, "error": None}
    newest = max(p.stat().st_mtime for p in files.values())
    row["updated"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(newest))
    try:
        row.update(_state(run_dir, files))
    except CorruptRunError as err:
        warnings.warn(f"{run_dir}: {err}", stacklevel=2)
        row.update(state="corrupt", error=str(err)[:300])
    return row


def _state(run_dir: Path, files: dict[str, Path]) -> dict[str, Any]:
    """State, predictions and error of one run directory (raises CorruptRunError for an unreadable file)."""
    read_config(run_dir / "config.yaml")
    row: dict[str, Any] = {"n_predictions": len(read_predictions(run_dir / "predictions.jsonl").by_id)}
    holder = RunStore(run_dir, {}).holder() if "metrics.json" not in files else None
    if "metrics.json" in files:
        row.update(state="finished", n_questions=RunStore(run_dir, {}).load_metrics().get("n_questions"))
    elif holder is not None:
        row.update(state="running", error=f"written by {holder}")
    elif ERROR_FILE in files:
        err = read_json(files[ERROR_FILE], fix="delete error.json (the run resumes when rerun)")
        err = err if isinstance(err, dict) else {"type": "unknown", "message": str(err)}
        row.update(state="failed", error=f"{err.get('type')}: {err.get('message', '')}"[:300])
    else:
        row["state"] = "partial" if row["n_predictions"] else "started"
    return row


def _is_run_config(path: Path) -> bool:
    if ".hydra" in path.parts or "wandb" in path.parts or ASIDE in path.parts:
        return False
    if (path.parent / LOCK_FILE).exists():  # a directory a run claimed, even if its config.yaml is unreadable
        return True
    try:
        return "config_hash" in (yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, OSError, UnicodeDecodeError, TypeError):
        return False


def scan(root: str | Path | None = None, sweep: str | Path | None = None) -> pd.DataFrame:
    """One row per run directory under ``root`` (columns :data:`COLUMNS`); with ``sweep``, one per sweep job."""
    root = existing_root(root)
    rows = {}
    for cfg in sorted(root.rglob("config.yaml")):
        if _is_run_config(cfg):
            run_id = cfg.parent.relative_to(root).as_posix()
            rows[run_id] = {"run_id": run_id, **_run_state(cfg.parent), "run_dir": str(cfg.parent)}
    if sweep is None:
        return pd.DataFrame(list(rows.values()), columns=COLUMNS)
    out = []
    for job, run_id, job_dir in sweep_jobs(sweep):
        row = rows.get(run_id) or _no_run_dir(run_id, root, job_dir)
        if row["state"] != "finished" and not row.get("error"):
            row = {**row, "error": _job_log_error(Path(sweep), job)}
        out.append({"job": job, **row, "job_dir": str(job_dir) if job_dir.exists() else None})
    return pd.DataFrame(out, columns=["job", *COLUMNS, "job_dir"])


def _no_run_dir(run_id: str | None, root: Path, job_dir: Path) -> dict[str, Any]:
    """A sweep job without a run directory: ``started`` if Hydra created its job directory, else ``pending``."""
    row = {"run_id": run_id, "state": "pending", "n_predictions": 0,
           "run_dir": str(root / run_id) if run_id else None}
    if run_id is None:
        row["error"] = "the job's overrides no longer compose"
    elif job_dir.exists():
        row.update(state="started", error="no run directory: still loading, or failed before claiming it")
    return row


def _job_log_error(sweep: Path, job: int) -> str | None:
    """The last error line of a submitit job's stderr (``<sweep>/.submitit/<id>_<job>/*_log.err``), if any."""
    logs = sorted(sweep.glob(f".submitit/*_{job}/*_log.err"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return None
    lines = [ln.strip() for ln in logs[-1].read_text(errors="replace").splitlines()[-200:] if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or [None])[-1]


def sweep_jobs(sweep: str | Path) -> list[tuple[int, str | None, Path]]:
    """(job number, run_id, job directory) for every job of a Hydra multirun (basic sweeper grid).

    The grid is re-expanded from ``multirun.yaml`` the way Hydra's basic sweeper does (the sweeper's ``params``,
    e.g. an experiment file's grid, then the command line's overrides, a later value of a key replacing an earlier
    one), and each job's config is composed from kvbench's ``conf/`` to get its run_id (None if the job's
    overrides no longer compose).
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    import kvbench  # noqa: F401  (registers the config resolvers)
    from kvbench.cli import CONF_DIR

    sweep = Path(sweep)
    multirun = sweep / "multirun.yaml"
    if not multirun.exists():
        raise UsageError(f"{sweep} is not a Hydra sweep directory (no multirun.yaml)")
    hydra_cfg = yaml.safe_load(multirun.read_text())["hydra"]
    params = (hydra_cfg.get("sweeper") or {}).get("params") or {}
    overrides = [f"{k}={v}" for k, v in params.items()] + list(hydra_cfg["overrides"]["task"])
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)
    jobs = [job for batch in batches for job in batch]
    out = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for num, job in enumerate(jobs):
            out += [(num, run_id, sweep / str(num)) for run_id in _run_ids(compose, job)]
    return out


def _run_ids(compose: Any, job: list[str]) -> list[str | None]:
    """The run_id(s) of one job: one per budget for a shared-prefill budget list (``budget=[0.1,0.2]``), one per
    method and budget for a method grid (``methods=[snapkv,adakv]``)."""
    from omegaconf import OmegaConf

    overrides = [o for o in job if not o.startswith("hydra")]
    try:
        cfg = compose("config", overrides=overrides)
        if cfg.get("methods") is not None:  # each method composed as method=<name> (kvbench.sweep, loads torch)
            from kvbench.sweep import budget_configs, method_configs

            return [str(one.run_id) for grid in method_configs(cfg, overrides).values()
                    for one in budget_configs(grid).values()]
        if not OmegaConf.is_list(cfg.budget):
            return [str(cfg.run_id)]
        return [str(compose("config", overrides=[*overrides, f"budget={b}"]).run_id) for b in cfg.budget]
    except Exception:  # an option that no longer exists: list the job without a run_id
        return [None]


def format_status(df: pd.DataFrame, show_all: bool = False) -> str:
    """A count per state and a table of the runs that are not finished (all runs with ``show_all``)."""
    counts = df["state"].value_counts()
    shown_states = [s for s in STATES if (s != "pending" or "job" in df) and (s != "corrupt" or counts.get(s, 0))]
    head = ", ".join(f"{int(counts.get(s, 0))} {s}" for s in shown_states)
    shown = df if show_all else df[df["state"] != "finished"]
    if shown.empty:
        return f"{head}\n"
    cols = [c for c in ("job", "state", "run_id", "n_predictions", "updated", "error", "job_dir") if c in shown]
    body = shown[cols].fillna("").to_markdown(index=False)
    return f"{head}\n\n{body}\n"


def main(root: str | None = None, sweep: str | None = None, show_all: bool = False) -> int:
    """Print the status; the exit status is 1 when a run failed or is corrupt, else 0."""
    df = scan(root, sweep)
    if df.empty:
        print(f"no runs under {root_text(root)} (no run directory with a config.yaml)")
        return 0
    print(format_status(df, show_all), end="")
    return int(df["state"].isin(["failed", "corrupt"]).any())

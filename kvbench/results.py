"""Run directories: the resolved config, per-sample predictions (append-only, the resume key) and final metrics.

Layout of one run (the path depends only on the config, never on time)::

    <results>/<task>/<model>/<method>/<allocator>/<protocol>/budget=<b>/seed=<s>/
        config.yaml         resolved config + config_hash, the method's input files, the data and model identity
        predictions.jsonl   one line per scored question (:class:`kvbench.schema.PredictionRecord`), appended and
                            flushed as each is scored, keyed by ``id`` (a later complete line of an id wins)
        metrics.json        written atomically, last: its presence means "finished" (:class:`kvbench.schema.RunMetrics`)
        error.json          only after a failure of the process that claimed the run; removed when it finishes
        .lock               held (flock) by the process writing the run; says which (pid, host, since)

Rerunning resumes: finished lines are skipped, a half-written last line is cut by the (locked) writer, a finished
run returns at once, and a different config, other method input files, other data or other model files for the
same directory are refused naming what differs. ``config_hash`` is recomputed from the stored config on every
open, so a hand-edited config.yaml is refused. One process at a time writes a run directory: a second one stops at
once with :class:`RunDirBusyError`; the lock is the kernel's, so a process that dies releases it. Readers
(:func:`load_results`, the report, status, loggers) never write; an unreadable file is one
:class:`~kvbench.runfiles.CorruptRunError` naming file, line and fix. ``overwrite=true`` moves the old files to
``.overwritten/`` and deletes them only once the new run has claimed the directory (restored otherwise).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from kvbench.errors import UsageError
from kvbench.identity import data_difference, model_difference
from kvbench.runfiles import (
    CorruptRunError,
    Predictions,
    append_line,
    atomic_write,
    read_json,
    read_predictions,
    read_yaml,
    repair_tail,
)

# keys that do not change results and so are not part of the config hash
VOLATILE_KEYS = ("paths", "limit", "overwrite", "progress", "run_dir", "hydra", "device", "threads", "logger")
# where a task's loader finds its data files (the data root moves between machines; the data's identity is the
# digest of the loaded samples, recorded separately: kvbench.identity)
VOLATILE_LOADER_KEYS = ("root", "data_dir")
ERROR_FILE = "error.json"
LOCK_FILE = ".lock"
ASIDE = ".overwritten"  # overwrite=true: the old run's files until the new run has claimed the directory
RUN_FILES = ("config.yaml", "predictions.jsonl", "metrics.json", ERROR_FILE)
VARIANT_FIX = ("Give the variant its own name (e.g. method.name=snapkv_w8), use another paths.results, or pass "
               "overwrite=true to discard the old run.")

__all__ = ["ConfigMismatchError", "CorruptRunError", "RunDirBusyError", "RunStore", "config_hash", "finished_runs",
           "load_results", "results_root"]
CONFIG_FILE = Path(__file__).resolve().parents[1] / "conf" / "config.yaml"


class ConfigMismatchError(UsageError):
    """The run directory holds results of a different configuration or of other inputs."""


class RunDirBusyError(UsageError):
    """Another live process is writing the run directory."""


def config_hash(cfg: dict[str, Any]) -> str:
    """sha256 (16 hex chars) of the canonical JSON of the config without volatile keys."""
    stable = {k: v for k, v in cfg.items() if k not in VOLATILE_KEYS}
    loader = (stable.get("task") or {}).get("loader")
    if isinstance(loader, dict):
        kept = {k: v for k, v in loader.items() if k not in VOLATILE_LOADER_KEYS}
        stable["task"] = {**stable["task"], "loader": kept}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_config(path: Path) -> dict[str, Any]:
    """A run's config.yaml, checked: a mapping with ``config`` and a ``config_hash`` that matches it."""
    stored = read_yaml(path)
    if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict) or "config_hash" not in stored:
        raise CorruptRunError(f"{path}: not a kvbench run config (no config/config_hash mapping); restore it, or "
                              "rerun with overwrite=true to start this run again")
    if config_hash(stored["config"]) != stored["config_hash"]:
        raise CorruptRunError(f"{path}: the stored config does not match its config_hash {stored['config_hash']} "
                              "(edited by hand?); restore it, or rerun with overwrite=true to start this run again")
    return stored


class RunStore:
    """One run directory."""

    _lock_fd: int | None = None  # the held lock's file descriptor (class default: also set if __init__ raised)
    claimed: bool = False  # this process opened (locked and wrote config.yaml of) the directory

    def __init__(self, run_dir: str | Path, cfg: dict[str, Any]) -> None:
        self.dir = Path(run_dir)
        self.cfg = cfg
        self.hash = config_hash(cfg)
        self.config_path = self.dir / "config.yaml"
        self.predictions_path = self.dir / "predictions.jsonl"
        self.metrics_path = self.dir / "metrics.json"
        self.error_path = self.dir / ERROR_FILE
        self.overwrite = False

    @property
    def complete(self) -> bool:
        return self.metrics_path.exists()

    def stored(self) -> dict[str, Any] | None:
        """The checked config.yaml, or None if there is none."""
        return read_config(self.config_path) if self.config_path.exists() else None

    def check(self) -> None:
        """Refuse a directory that holds results of another configuration (writes nothing)."""
        old = self.stored()
        if old is not None and old["config_hash"] != self.hash:
            diff = _diff(old["config"], self.cfg)
            raise ConfigMismatchError(
                f"{self.dir} already holds results of a different configuration (hash {old['config_hash']} "
                f"vs {self.hash}; differing keys: {diff}). {VARIANT_FIX}")

    def check_inputs(self, inputs: dict[str, str] | None = None, data: dict[str, str] | None = None,
                     model: dict[str, Any] | None = None) -> None:
        """Refuse a directory run with other method input files, other data or other model files (None: not
        known yet, not compared; a directory written before an identity was recorded passes)."""
        old = self.stored() or {}
        why = []
        if inputs is not None and (old.get("inputs", inputs) or {}) != inputs:
            before = old.get("inputs") or {}
            why.append("other input files (" + "; ".join(
                f"{k}: {before.get(k)} then, {inputs.get(k)} now" for k in sorted({*before, *inputs})
                if before.get(k) != inputs.get(k)) + ")")
        if data is not None and (d := data_difference(old.get("data"), data)):
            why.append(d)
        if model is not None and (m := model_difference(old.get("model"), model)):
            why.append(m)
        if why:
            raise ConfigMismatchError(f"{self.dir} was run with {'; '.join(why)}. Give this variant its own name "
                                      "(e.g. method.name=compresskv_recal), use another paths.results, or pass "
                                      "overwrite=true to discard it.")

    def discard(self) -> None:
        """``overwrite=true``: the next :meth:`open` moves the old files aside and deletes them once it has claimed
        the directory (they come back if it fails before)."""
        self.overwrite = True

    def preflight(self) -> None:
        """Before anything is loaded (writes nothing): refuse a directory another process holds, one of another
        configuration (unless overwriting) and one whose files cannot be read."""
        if self.dir.exists() and (owner := self.holder()) is not None:
            raise RunDirBusyError(f"{self.dir} is being written by another process ({owner}). Wait for it to end or "
                                  "cancel it; a process that dies releases the directory.")
        if not self.overwrite:
            self.check()
            self.predictions()
            if self.complete:
                self.load_metrics()

    def open(self, inputs: dict[str, str] | None = None, data: dict[str, str] | None = None,
             model: dict[str, Any] | None = None) -> None:
        """Take the directory's lock, then create it and its config.yaml, or check that the one there belongs to
        the same config and inputs (``inputs``: the method's input files ``{label: sha256}``; ``data``: the
        samples' digests; ``model``: the model files' identity). The writer repairs a partial last line."""
        self.lock()
        try:
            if self.overwrite:
                self._move_aside()
            else:
                self._restore_aside()  # left by a process killed between moving the old run aside and claiming
            self.check()
            self.check_inputs(inputs or {}, data, model)
            repair_tail(self.predictions_path)
            self.predictions()  # a corrupt line stops here, before anything is appended after it
            self._write_config(inputs or {}, data, model)
        except BaseException:
            self._restore_aside()
            self.unlock()
            raise
        shutil.rmtree(self.dir / ASIDE, ignore_errors=True)
        self.claimed = True

    def _move_aside(self) -> None:
        aside = self.dir / ASIDE
        shutil.rmtree(aside, ignore_errors=True)
        aside.mkdir()
        for name in RUN_FILES:
            if (self.dir / name).exists():
                os.replace(self.dir / name, aside / name)

    def _restore_aside(self) -> None:
        aside = self.dir / ASIDE
        if aside.is_dir() and not self.config_path.exists():
            for p in aside.iterdir():
                os.replace(p, self.dir / p.name)
            aside.rmdir()

    def _write_config(self, inputs: dict[str, str], data: dict[str, str] | None,
                      model: dict[str, Any] | None) -> None:
        """Write config.yaml, or extend its data record (a larger ``limit``) and fill in a model commit learnt."""
        old = self.stored()
        if old is None:
            record = {"config_hash": self.hash, "config": self.cfg, "inputs": inputs, "data": data, "model": model}
        else:
            merged = dict(old.get("data") or {})
            for k, v in (data or {}).items():
                merged.setdefault(k, v)  # recorded digests stay (check_inputs found them equal)
            known = old.get("model")
            newer = model if known is None or (model and "hub" in known and not known.get("commit")) else known
            if merged == (old.get("data") or {}) and newer == known:
                return
            record = {**old, "data": merged or None, "model": newer}
        atomic_write(self.config_path, yaml.safe_dump(record, sort_keys=False, allow_unicode=True))

    def lock(self) -> None:
        """Hold an exclusive ``flock`` on ``<dir>/.lock`` until :meth:`unlock` or the process ends; a directory
        another process holds raises :class:`RunDirBusyError` naming it. On a file system without ``flock`` (some
        parallel file systems) the run goes on unlocked, with a warning."""
        if self._lock_fd is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusyError(f"{self.dir} is being written by another process ({owner}). Wait for it to end or "
                                  "cancel it; a process that dies releases the directory.") from None
        except OSError as err:
            os.close(fd)
            warnings.warn(f"cannot lock {self.dir} ({err}); writing it unlocked", stacklevel=2)
            return
        os.ftruncate(fd, 0)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "slurm_job": os.environ.get("SLURM_JOB_ID")}
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock (the .lock file stays: deleting it would race with a process about to lock it)."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __del__(self) -> None:
        self.unlock()

    def holder(self) -> str | None:
        """Who holds the directory's lock (its ``.lock`` text) if a live process does, else None."""
        if self._lock_fd is not None:
            return None
        path = self.dir / LOCK_FILE
        if not path.is_file():
            return None
        with open(path, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read(4096).decode(errors="replace").strip() or "unknown"
            except OSError:
                return None
            fcntl.flock(f, fcntl.LOCK_UN)
        return None

    def predictions(self) -> Predictions:
        """The complete lines, keyed by id (read only; a partial last line is skipped)."""
        return read_predictions(self.predictions_path)

    def records(self) -> list[dict[str, Any]]:
        """One record per question id (the last complete line of an id)."""
        return self.predictions().records

    def done_ids(self) -> set[str]:
        return set(self.predictions().by_id)

    def append(self, record: dict[str, Any]) -> None:
        append_line(self.predictions_path, json.dumps(record, default=float) + "\n")

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        atomic_write(self.metrics_path, json.dumps(metrics, indent=2, default=float) + "\n")
        self.error_path.unlink(missing_ok=True)

    def owned(self) -> bool:
        """The directory exists and its config.yaml is this configuration's."""
        try:
            return (self.stored() or {}).get("config_hash") == self.hash
        except CorruptRunError:
            return False

    def write_error(self, err: BaseException) -> None:
        """Record a failure (``error.json``): exception type, message, the traceback's last lines, time. Only the
        process that claimed the directory does, and never into a finished run."""
        if not self.claimed or self.complete:
            return
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        try:
            n = len(self.predictions().by_id)
        except CorruptRunError:
            n = None
        record = {"type": type(err).__name__, "message": str(err), "traceback": tb[-4000:],
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "n_predictions": n}
        atomic_write(self.error_path, json.dumps(record, indent=2) + "\n")

    def load_metrics(self) -> dict[str, Any]:
        metrics = read_json(self.metrics_path)
        if not isinstance(metrics, dict):
            raise CorruptRunError(f"{self.metrics_path}: not a kvbench metrics file (not a mapping); delete it and "
                                  "rerun to aggregate the predictions again")
        return metrics


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        if not prefix and k in VOLATILE_KEYS:
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


#: The columns that name a run, present in both run-level and per-sample frames (plus ``run_dir``).
KEY_COLUMNS = ("task", "model", "method", "allocator", "protocol", "budget", "seed")


def _keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """The naming columns of a run from its resolved config (None where the config lacks one)."""
    def name(group: str) -> Any:
        return (cfg.get(group) or {}).get("name")

    budget = cfg.get("budget")
    return {
        "task": name("task"), "model": name("model"), "method": name("method"), "allocator": name("allocator"),
        "protocol": cfg.get("protocol"), "budget": None if budget is None else float(budget),
        "seed": cfg.get("seed"), "main_metric": ((cfg.get("task") or {}).get("metrics") or [None])[0],
    }  # fmt: skip


def _flat(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.json_normalize(rows, sep=".") if rows else pd.DataFrame()


def _counted(records: list[dict[str, Any]], metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The records metrics.json was computed from: after a rerun with a smaller ``limit`` the file holds more
    samples than the metrics count; samples are appended in task order, so those are the first ``n_samples``."""
    n = metrics.get("n_samples")
    if n is None:
        return records
    first = list(dict.fromkeys(r.get("sample_id") for r in records))[: int(n)]
    keep = set(first)
    return [r for r in records if r.get("sample_id") in keep]


def results_root(root: str | Path | None = None) -> Path:
    """The results root every reader uses: ``root`` when given, else ``paths.results`` of ``conf/config.yaml``
    resolved as a run resolves it (``KVBENCH_RESULTS``, else ``results``), so the report, status and the scripts
    read where ``python -m kvbench`` writes."""
    if root is not None:
        return Path(root)
    from omegaconf import OmegaConf

    paths = OmegaConf.load(CONFIG_FILE).paths
    return Path(str(OmegaConf.to_container(paths, resolve=True)["results"]))


def root_text(root: str | Path | None) -> str:
    """How a results root was chosen, for messages: ``/x`` or ``results (paths.results; set KVBENCH_RESULTS)``."""
    return str(root) if root is not None else f"{results_root()} (paths.results; set KVBENCH_RESULTS or pass a root)"


def existing_root(root: str | Path | None = None) -> Path:
    """:func:`results_root`, refusing (one UsageError line) one that does not exist."""
    path = results_root(root)
    if not path.is_dir():
        raise UsageError(f"results root {root_text(root)} does not exist")
    return path


def finished_runs(root: str | Path | None = None, samples: bool = False) -> pd.DataFrame:
    """:func:`load_results` of :func:`results_root`, refusing (one UsageError line) a root without finished runs."""
    df = load_results(existing_root(root), samples)
    if df.empty:
        raise UsageError(f"results root {root_text(root)} has no finished runs (no metrics.json)")
    return df


def load_results(root: str | Path, samples: bool = False) -> pd.DataFrame:
    """Every finished run under ``root`` as one row, or (``samples=True``) one row per scored question.

    Columns: the flattened resolved config (``method.window``, ``task.loader.lengths``, ``budget``, ...), the
    flattened ``metrics.json`` (``score.exact_match``, ``kv_bytes_kept``, ``prefill_s``, ...) or prediction record
    (``scores.exact_match``, ``prediction``, ``meta.depth``, ...), and for both frames the naming columns
    :data:`KEY_COLUMNS` (``task``, ``model``, ``method`` are names, ``budget`` a float), ``run_dir``,
    ``main_metric`` (the task's first metric) and ``main_score`` (that metric on the 0-100 scale of the tables).
    Only finished runs (``metrics.json`` present) are loaded; ``kvbench.report status`` lists the others. Nothing
    is written; a run whose files cannot be read is skipped with a warning naming the file, line and fix.
    """
    frames = []
    for metrics_path in sorted(Path(root).rglob("metrics.json")):
        if ASIDE in metrics_path.parts:
            continue
        try:
            part = _run_frame(metrics_path.parent, samples)
        except (CorruptRunError, OSError) as err:
            warnings.warn(f"skipping {metrics_path.parent}: {err}", stacklevel=2)
            continue
        if part is not None:
            frames.append(part)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*KEY_COLUMNS, "run_dir"])


def _run_frame(run_dir: Path, samples: bool) -> pd.DataFrame | None:
    """One finished run's rows (None if it has none)."""
    cfg = read_config(run_dir / "config.yaml")["config"]
    store = RunStore(run_dir, cfg)
    metrics = store.load_metrics()
    flat_cfg = pd.json_normalize(cfg, sep=".").iloc[0].to_dict()
    keys = {**_keys(cfg), "run_dir": str(run_dir)}
    if samples:
        part = _flat(_counted(store.records(), metrics))
        scale = 100.0  # per-question scores are in [0, 1]; tables use 0-100
        col = f"scores.{keys['main_metric']}"
    else:
        part = _flat([metrics])
        scale, col = 1.0, f"score.{keys['main_metric']}"
    if part.empty:
        return None
    extra = {**{k: v for k, v in flat_cfg.items() if k not in part.columns}, **keys}
    part = pd.concat([part.drop(columns=[k for k in keys if k in part.columns]),
                      pd.DataFrame([extra] * len(part), index=part.index)], axis=1)
    part["main_score"] = scale * part[col].astype(float) if col in part else float("nan")
    return part

"""Run directories: the resolved config, per-sample predictions (append-only, the resume key) and final metrics.

Layout of one run (the path depends only on the config, never on time)::

    <results>/<task>/<model>/<method>/<allocator>/<protocol>/budget=<b>/seed=<s>/
        config.yaml         resolved config + config_hash
        predictions.jsonl   one line per scored question, appended and flushed as each finishes
        metrics.json        written atomically, last: its presence means "finished"
        error.json          only after a failure (exception type, message, traceback); removed when the run finishes
        .lock               held (flock) by the process writing the run; says which (pid, host, since)

Rerunning resumes: finished lines are skipped, a half-written last line is dropped, a finished run returns at
once, and a different config for the same directory is refused. One process at a time writes a run directory: a
second one (a resubmitted sweep while the old jobs still run) stops at once with :class:`RunDirBusyError`. The
lock is the kernel's, so a process that dies, even by SIGKILL or preemption, releases it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from kvbench.errors import UsageError

# keys that do not change results and so are not part of the config hash
VOLATILE_KEYS = ("paths", "limit", "overwrite", "progress", "run_dir", "hydra", "device", "threads", "logger")
# where a task's loader finds its data files (the data root moves between machines; the data is pinned elsewhere)
VOLATILE_LOADER_KEYS = ("root", "data_dir")
ERROR_FILE = "error.json"
LOCK_FILE = ".lock"


class ConfigMismatchError(UsageError):
    """The run directory holds results of a different configuration."""


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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunStore:
    """One run directory."""

    _lock_fd: int | None = None  # the held lock's file descriptor (class default: also set if __init__ raised)

    def __init__(self, run_dir: str | Path, cfg: dict[str, Any]) -> None:
        self.dir = Path(run_dir)
        self.cfg = cfg
        self.hash = config_hash(cfg)
        self.config_path = self.dir / "config.yaml"
        self.predictions_path = self.dir / "predictions.jsonl"
        self.metrics_path = self.dir / "metrics.json"
        self.error_path = self.dir / ERROR_FILE

    @property
    def complete(self) -> bool:
        return self.metrics_path.exists()

    def check(self) -> None:
        """Refuse a directory that holds results of another configuration (writes nothing)."""
        if not self.config_path.exists():
            return
        old = yaml.safe_load(self.config_path.read_text()) or {}
        if old.get("config_hash") != self.hash:
            diff = _diff(old.get("config", {}), self.cfg)
            raise ConfigMismatchError(
                f"{self.dir} already holds results of a different configuration (hash {old.get('config_hash')} "
                f"vs {self.hash}; differing keys: {diff}). Give the variant its own name (e.g. "
                "method.name=snapkv_w8), use another paths.results, or pass overwrite=true to discard the old run."
            )

    def discard(self) -> None:
        """Delete this run's files (``overwrite=true``), after taking the directory's lock."""
        if self.dir.exists():
            self.lock()
        for p in (self.metrics_path, self.predictions_path, self.config_path, self.error_path):
            p.unlink(missing_ok=True)

    def open(self, inputs: dict[str, str] | None = None) -> None:
        """Take the directory's lock, then create it and its config.yaml, or check that the one there belongs to
        the same config. ``inputs`` (the method's input files, ``{label: sha256}``) are recorded there, and a
        directory run with other input files is refused."""
        self.lock()
        try:
            self.check()
            self._check_inputs(inputs or {})
        except ConfigMismatchError:
            self.unlock()
            raise
        if not self.config_path.exists():
            text = yaml.safe_dump({"config_hash": self.hash, "config": self.cfg, "inputs": inputs or {}},
                                  sort_keys=False)
            _atomic_write(self.config_path, text)

    def _check_inputs(self, inputs: dict[str, str]) -> None:
        """Refuse to resume with other input files (a run directory written before inputs were recorded passes)."""
        stored = yaml.safe_load(self.config_path.read_text()) if self.config_path.exists() else None
        old = (stored or {}).get("inputs", inputs) or {}
        if old != inputs:
            diff = "; ".join(f"{k}: {old.get(k)} then, {inputs.get(k)} now"
                             for k in sorted({*old, *inputs}) if old.get(k) != inputs.get(k))
            raise ConfigMismatchError(
                f"{self.dir} was run with other input files ({diff}). Give this variant its own name (e.g. "
                "method.name=compresskv_recal), use another paths.results, or pass overwrite=true to discard it.")

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

    def records(self) -> list[dict[str, Any]]:
        """Finished lines; a partial last line (killed mid-write) is cut off the file."""
        if not self.predictions_path.exists():
            return []
        raw = self.predictions_path.read_bytes()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):  # half-written last line
            with open(self.predictions_path, "r+b") as f:
                f.truncate(end)
        return [json.loads(line) for line in raw[:end].decode().splitlines() if line.strip()]

    def done_ids(self) -> set[str]:
        return {r["id"] for r in self.records()}

    def append(self, record: dict[str, Any]) -> None:
        with open(self.predictions_path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        _atomic_write(self.metrics_path, json.dumps(metrics, indent=2, default=float) + "\n")
        self.error_path.unlink(missing_ok=True)

    def owned(self) -> bool:
        """The directory exists and its config.yaml is this configuration's."""
        if not self.config_path.exists():
            return False
        return (yaml.safe_load(self.config_path.read_text()) or {}).get("config_hash") == self.hash

    def write_error(self, err: BaseException) -> None:
        """Record a failure (``error.json``): exception type, message, the traceback's last lines, time."""
        tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        record = {"type": type(err).__name__, "message": str(err), "traceback": tb[-4000:],
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "n_predictions": len(self.records())}
        _atomic_write(self.error_path, json.dumps(record, indent=2) + "\n")

    def load_metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics_path.read_text())


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


def record_failure(run_dir: str | Path, cfg: dict[str, Any], err: BaseException) -> bool:
    """Write ``error.json`` into ``run_dir`` if this configuration had claimed it; returns whether it did.

    A directory that holds another configuration (or none yet) is left alone.
    """
    store = RunStore(run_dir, cfg)
    if not store.owned() or isinstance(err, (RunDirBusyError, ConfigMismatchError)):  # refused: not this run's
        return False
    store.write_error(err)
    return True


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


def load_results(root: str | Path, samples: bool = False) -> pd.DataFrame:
    """Every finished run under ``root`` as one row, or (``samples=True``) one row per scored question.

    Columns: the flattened resolved config (``method.window``, ``task.loader.lengths``, ``budget``, ...), the
    flattened ``metrics.json`` (``score.exact_match``, ``kv_bytes_kept``, ``prefill_s``, ...) or prediction record
    (``scores.exact_match``, ``prediction``, ``meta.depth``, ...), and for both frames the naming columns
    :data:`KEY_COLUMNS` (``task``, ``model``, ``method`` are names, ``budget`` a float), ``run_dir``,
    ``main_metric`` (the task's first metric) and ``main_score`` (that metric on the 0-100 scale of the tables).
    Only finished runs (``metrics.json`` present) are loaded; ``kvbench.report status`` lists the others.
    """
    frames = []
    for metrics_path in sorted(Path(root).rglob("metrics.json")):
        run_dir = metrics_path.parent
        try:
            cfg = yaml.safe_load((run_dir / "config.yaml").read_text())["config"]
        except (OSError, KeyError, TypeError, yaml.YAMLError) as err:
            warnings.warn(f"skipping {run_dir}: no readable config.yaml ({err})", stacklevel=2)
            continue
        flat_cfg = pd.json_normalize(cfg, sep=".").iloc[0].to_dict()
        keys = {**_keys(cfg), "run_dir": str(run_dir)}
        if samples:
            part = _flat(_counted(RunStore(run_dir, cfg).records(), json.loads(metrics_path.read_text())))
            scale = 100.0  # per-question scores are in [0, 1]; tables use 0-100
            col = f"scores.{keys['main_metric']}"
        else:
            part = _flat([json.loads(metrics_path.read_text())])
            scale, col = 1.0, f"score.{keys['main_metric']}"
        if part.empty:
            continue
        extra = {**{k: v for k, v in flat_cfg.items() if k not in part.columns}, **keys}
        part = pd.concat([part.drop(columns=[k for k in keys if k in part.columns]),
                          pd.DataFrame([extra] * len(part), index=part.index)], axis=1)
        part["main_score"] = scale * part[col].astype(float) if col in part else float("nan")
        frames.append(part)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*KEY_COLUMNS, "run_dir"])

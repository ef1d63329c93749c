"""Checks of the top-level keys a user types, before anything heavy (no torch, transformers or data imported here).

``check_config(cfg)`` is the first thing a run does (the CLI calls it before importing the runner): every
top-level key gets its type, range or name checked, and every path component of the run directory must be a safe
name, so that a bad value answers in seconds with one :class:`~kvbench.errors.UsageError` and nothing is claimed,
loaded or written. Containment: the run directory must lie strictly inside ``paths.results``.
"""

from __future__ import annotations

import math
import re
import unicodedata
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, OmegaConfBaseException

from kvbench.errors import UsageError
from kvbench.loggers import LOGGERS
from kvbench.prompt import POSTPROCESS, TRUNCATIONS
from kvbench.protocols import SELECTABLE

#: One path component of a run directory: ASCII letters, digits and ``._+=-``, not starting with a dot.
SAFE_NAME = re.compile(r"[A-Za-z0-9_+=-][A-Za-z0-9._+=-]{0,127}")
DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")
NAMED_GROUPS = ("task", "model", "method", "allocator")  # their ``name`` is a run-directory component
SEED_LIMIT = 2**63


def check_budget(budget: object) -> float:
    """One clear message for a non-numeric or non-positive budget."""
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise UsageError(f"budget must be a number (a fraction <= 1 or tokens per head > 1), got {budget!r}")
    if not budget > 0 or math.isinf(budget):
        raise UsageError(f"budget must be > 0 (a fraction <= 1 or tokens per head > 1), got {budget!r}")
    return float(budget)


def check_budgets(value: object) -> list[float]:
    """``budget=<b>`` or ``budget=[b1,b2,...]`` as a non-empty list of distinct budgets."""
    raw = list(value) if isinstance(value, list | tuple) else [value]
    budgets = [check_budget(b) for b in raw]
    if not budgets:
        raise UsageError("budget=[] names no budget; give one or more, e.g. budget=[0.1,0.2,0.5]")
    if len(set(budgets)) < len(budgets):
        raise UsageError(f"budget={raw} names a budget twice")
    return budgets


def check_methods(value: object) -> list[str]:
    """``methods=[a,b]`` (a method grid; or one name) as a list of distinct method options of conf/method/."""
    from kvbench.__main__ import CONF_DIR  # the CLI's config directory (imported late: it is the entry point)
    from kvbench.cli import unknown_option

    names = list(value) if isinstance(value, list | tuple) else [value]
    if not names:
        raise UsageError("methods=[] names no method; give one or more, e.g. methods=[snapkv,adakv]")
    if bad := [n for n in names if not isinstance(n, str)]:
        raise UsageError(f"methods must name method options (conf/method/<name>.yaml), got {bad[0]!r}")
    if len(set(names)) < len(names):
        raise UsageError(f"methods={names} names a method twice")
    if message := unknown_option([f"method={n}" for n in names], CONF_DIR, ("method",)):
        raise UsageError(f"methods: {message}")
    return names


def safe_name(value: object, key: str, segments: bool = False) -> str:
    """``value`` if it is a safe run-directory component (with ``segments``: several joined by ``/``), else a
    UsageError naming the key. Refused: empty, ``.``/``..``, separators, absolute paths, non-ASCII or control
    characters (look-alike slashes, right-to-left marks, zero-width spaces)."""
    text = str(value)
    parts = text.split("/") if segments else [text]
    bad = [p for p in parts if not SAFE_NAME.fullmatch(p)]
    if bad:
        shown = "".join(c if c.isprintable() and c.isascii() else f"\\u{ord(c):04x}" for c in text)
        odd = sorted({unicodedata.name(c, hex(ord(c))) for c in text if not c.isascii()})
        raise UsageError(f"{key}={shown!r} cannot name a run directory: use ASCII letters, digits and ._+=- "
                         f"(not starting with a dot{', one / between parts' if segments else ''})"
                         + (f"; it contains {', '.join(odd)}" if odd else ""))
    return text


def _positive_int(cfg: dict[str, Any], key: str, what: str, nullable: bool = True) -> None:
    v = cfg.get(key)
    if v is None and nullable:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UsageError(f"{key} must be {what}{' or null' if nullable else ''}, got {v!r}")


def _bool(cfg: dict[str, Any], key: str) -> None:
    if not isinstance(cfg.get(key), bool):
        raise UsageError(f"{key} must be true or false, got {cfg.get(key)!r}")


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers; a missing required value or a broken interpolation is one error."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except MissingMandatoryValue as err:
        key = re.search(r"Missing mandatory value: (\S+)", str(err))
        raise UsageError(f"missing required setting {key.group(1) if key else err} (e.g. model=hf "
                         "model.pretrained=Qwen/Qwen2.5-7B-Instruct)") from None
    except InterpolationResolutionError as err:
        raise UsageError(f"a setting cannot be resolved: {str(err).splitlines()[0]}") from None
    except OmegaConfBaseException as err:
        raise UsageError(f"invalid configuration: {str(err).splitlines()[0]}") from None


def check_keys(r: dict[str, Any]) -> None:
    """Types and ranges of the top-level keys (resolved config ``r``)."""
    check_budgets(r.get("budget"))
    if r.get("methods") is not None:
        check_methods(r["methods"])
    if r.get("protocol") not in SELECTABLE:
        raise UsageError(f"protocol={r.get('protocol')!r}; choose one of {', '.join(SELECTABLE)}")
    seed = r.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise UsageError(f"seed must be a whole number >= 0, got {seed!r}")
    _positive_int(r, "limit", "a positive number of samples")
    _positive_int(r, "threads", "a positive number of CPU threads")
    _positive_int(r, "prefill_chunk", "a positive number of tokens")
    for key in ("overwrite", "progress"):
        _bool(r, key)
    if not isinstance(r.get("device"), str) or not DEVICE.fullmatch(r["device"]):
        raise UsageError(f"device={r.get('device')!r}; choose auto, cpu, cuda, cuda:N or mps")
    logger = (r.get("logger") or {}).get("name", "none")
    if logger not in LOGGERS:
        raise UsageError(f"logger={logger!r}; choose one of {', '.join(LOGGERS)}")


def check_task_options(task: dict[str, Any]) -> None:
    """The prompting options of a task node (documented in ``conf/task/longbench/*.yaml``)."""
    if task.get("chat_template", "auto") not in ("auto", "never"):
        raise UsageError(f"task.chat_template={task['chat_template']!r}; choose auto (follow model.chat_template) "
                         "or never")
    if task.get("truncation", "context") not in TRUNCATIONS:
        raise UsageError(f"task.truncation={task['truncation']!r}; choose one of {', '.join(TRUNCATIONS)}")
    if task.get("tokenize", "separate") not in ("separate", "joint"):
        raise UsageError(f"task.tokenize={task['tokenize']!r}; choose separate or joint")
    steps = task.get("postprocess", ["strip"])
    if not isinstance(steps, list) or any(s not in POSTPROCESS for s in steps):
        raise UsageError(f"task.postprocess={steps}; steps must be among {', '.join(POSTPROCESS)}")
    if task.get("min_new_tokens", 0) not in (0, 1):
        raise UsageError("task.min_new_tokens must be 0 or 1 (end-of-sequence suppressed on the first token)")
    _positive_int(task, "max_new_tokens", "a positive number of tokens", nullable=False)


def check_names(r: dict[str, Any]) -> None:
    """Every run-directory component is a safe name and the run directory lies inside ``paths.results``."""
    for group in NAMED_GROUPS:
        node = r.get(group)
        if not isinstance(node, dict):
            raise UsageError(f"{group} is not a config group here (got {node!r}); choose one with {group}=<option>")
        safe_name(node.get("name"), f"{group}.name", segments=group == "task")
    results = r.get("paths", {}).get("results")
    if not isinstance(results, str) or not results.strip():
        raise UsageError(f"paths.results must name a directory, got {results!r}")
    check_inside(r.get("run_dir"), results)


def check_inside(run_dir: object, results: str) -> Path:
    """``run_dir`` resolved, refused unless it lies strictly inside ``results`` (symbolic links followed)."""
    root = Path(results).expanduser().resolve()
    path = Path(str(run_dir)).expanduser().resolve()
    if path == root or not path.is_relative_to(root):
        raise UsageError(f"run_dir={run_dir} is not inside paths.results={results}; every run is written under "
                         "the results root (set paths.results instead of run_dir)")
    return path


def check_config(cfg: DictConfig) -> dict[str, Any]:
    """Validate a composed kvbench config without importing torch; returns the resolved config."""
    resolved = resolve(cfg)
    check_keys(resolved)
    check_names(resolved)
    check_task_options(resolved.get("task") or {})
    return resolved

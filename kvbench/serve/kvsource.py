"""A kvbench run directory as the simulator's KV policy: what share of each prompt's KV a method keeps.

From ``metrics.json`` of ``python -m kvbench ...``: ``kv_bytes_kept / kv_bytes_full`` (the bytes the engine really
held, which is the achieved kept fraction with per-head budgets too; ``kept_fraction`` when bytes are absent) and
``compress_s / prefill_s``: the compression time relative to the prefill on the machine that ran it, which the
simulator adds to every prefill iteration on the simulated hardware (a deviation: the method's kernels are assumed
to scale like the prefill between machines). Generated tokens are never compressed (as in the engine).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbench.errors import UsageError


@dataclass(frozen=True)
class KVPolicy:
    kept: float = 1.0
    compress_frac: float = 0.0
    tag: str = "full"
    label: str = "full cache"  # method and budget, for figures
    score: dict[str, float] | None = None  # the run's accuracy (main metric first)
    source: str | None = None


def read_run(path: str | Path, compression_time: bool = True) -> KVPolicy:
    run = Path(path)
    mfile = run / "metrics.json"
    if not mfile.exists():
        raise UsageError(f"kv.source={str(run)!r} is not a finished kvbench run directory (no metrics.json)")
    m: dict[str, Any] = json.loads(mfile.read_text())
    if m.get("kv_bytes_full"):
        kept = m["kv_bytes_kept"] / m["kv_bytes_full"]
    elif m.get("kept_fraction") is not None:
        kept = m["kept_fraction"]
    else:
        raise UsageError(f"{mfile} has neither kv_bytes_kept/kv_bytes_full nor kept_fraction")
    frac = (m.get("compress_s") or 0.0) / m["prefill_s"] if compression_time and m.get("prefill_s") else 0.0
    parts = (m.get("task"), m.get("method"), m.get("allocator"), m.get("protocol"), f"b{m.get('budget')}")
    tag = "-".join(str(p).replace("/", "_") for p in parts if p is not None)
    return KVPolicy(kept=float(min(max(kept, 0.0), 1.0)), compress_frac=float(frac), tag=tag,
                    label=f"{m.get('method')} {m.get('budget')}",
                    score=m.get("score"), source=str(run))


def kv_policy(node: Any) -> KVPolicy:
    return read_run(node.source, bool(node.get("compression_time", True))) if node.get("source") else KVPolicy()

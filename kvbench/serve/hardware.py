"""Hardware profiles (``conf/serve/hardware/*.yaml``): effective rates the cost model divides by.

A GPU profile gives the published peak numbers (``spec``) and the fraction of them a serving engine reaches
(``efficiency``, our assumption, stated in each YAML). The ``cpu`` profile has no spec: its rates are fitted on this
machine by :mod:`kvbench.serve.calibrate` (the embedded model's real forwards, real copies) and read from its
calibration file, re-measured when the file is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kvbench.errors import UsageError


@dataclass(frozen=True)
class Hardware:
    """Effective rates (per second) and fixed costs (seconds) of one device."""

    name: str
    mem_bytes: float  # device memory for weights + KV + activations
    gemm_flops: float  # dense GEMM FLOP/s reached
    attn_flops: float  # prefill attention FLOP/s reached
    attn_bw: float  # decode attention bytes/s (reading K and V)
    weight_bw: float  # bytes/s streaming weights (the decode GEMM floor)
    pcie_bw: float  # host<->device bytes/s (swaps, expert loads)
    nvlink_bw: float  # device<->device bytes/s (EPD migrations)
    copy_call_s: float  # fixed cost of one copy call (cudaMemcpyAsync / one memcpy)
    fixed_s: float  # per-iteration overhead (scheduling, launch, Python)
    per_seq_s: float = 0.0  # per-iteration overhead per sequence in the batch
    page_map_s: float = 0.0  # mapping one physical page (vAttention), synchronous cost
    mem_util: float = 0.9  # fraction of mem_bytes the engine may use (vLLM's gpu_memory_utilization)
    batch_limit: int = 0  # most sequences one iteration may hold (0: no limit); the kvbench engine runs one
    paged_attn_factor: float = 1.0  # decode attention time of a paged (block-table) kernel / a contiguous one


def from_spec(name: str, spec: Any, efficiency: Any, overhead: Any) -> dict[str, float]:
    """Published peaks x efficiencies -> effective rates."""
    return {"name": name, "mem_bytes": spec.mem_gb * 2**30, "gemm_flops": spec.tflops * 1e12 * efficiency.gemm,
            "attn_flops": spec.tflops * 1e12 * efficiency.attn, "attn_bw": spec.mem_tbps * 1e12 * efficiency.bw,
            "weight_bw": spec.mem_tbps * 1e12 * efficiency.bw, "pcie_bw": spec.pcie_gbps * 1e9 * efficiency.pcie,
            "nvlink_bw": spec.nvlink_gbps * 1e9 * efficiency.nvlink, **dict(overhead)}


def load_calibration(path: str | Path) -> dict[str, float]:
    data = json.loads(Path(path).read_text())
    return data["hardware"]


def hardware_from_cfg(node: Any, calibrate: Any = None) -> Hardware:
    """Build a profile; ``calibrate(path, rounds)`` measures a missing calibration file (the cpu profile)."""
    if node.get("calibration"):
        path = Path(node.calibration)
        if not path.exists():
            if calibrate is None or not node.get("measure_if_missing"):
                script = "calibrate_serve.py" if node.get("measure_if_missing") else "calibrate_serve_gpu.py"
                raise UsageError(f"hardware {node.name!r}: calibration file {path} is missing; run "
                                 f"`python scripts/{script}` to measure it")
            calibrate(path, int(node.get("rounds", 3)))
        values = {**load_calibration(path), **dict(node.get("overrides") or {})}
        values["name"] = node.name
    else:
        values = from_spec(node.name, node.spec, node.efficiency, node.overhead)
    known = {f.name for f in fields(Hardware)}
    if unknown := sorted(set(values) - known):
        raise UsageError(f"hardware {node.name!r}: unknown keys {unknown}; known: {sorted(known)}")
    return Hardware(**values)

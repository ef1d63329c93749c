"""Operator microbenchmarks on a torch device, to replace a GPU profile's assumed efficiencies by measured rates.

Measured with the served arch's shapes (bf16 on CUDA): dense GEMM FLOP/s (``[T, hidden] x [hidden, 4 hidden]`` at
several T), prefill attention FLOP/s (causal SDPA), decode attention bytes/s (one query over a batch of KV
caches) and device -> pinned host copies (:mod:`kvbench.serve.copybench`: per-call cost and PCIe bandwidth). The
per-iteration overhead of a serving engine cannot be measured without one and stays the profile's. The result is
a calibration file (``{"hardware": {...}}``) that ``hardware.calibration=<file>`` reads, as the cpu profile's.
On CPU the same code runs with small shapes (the tests); it has not been run on a GPU yet.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from kvbench.serve.arch import Arch


def timed(fn: Any, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def gemm_flops(arch: Arch, device: torch.device, dtype: torch.dtype, tokens: tuple[int, ...], repeats: int) -> float:
    w = torch.randn(arch.hidden, 4 * arch.hidden, device=device, dtype=dtype)
    rates = []
    for t in tokens:
        x = torch.randn(t, arch.hidden, device=device, dtype=dtype)
        rates.append(2 * t * arch.hidden * 4 * arch.hidden / timed(lambda x=x: x @ w, device, repeats))
    return float(max(rates))  # the compute-bound rate (large T)


def prefill_attn_flops(arch: Arch, device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    q = torch.randn(1, arch.heads, n, arch.head_dim, device=device, dtype=dtype)
    k = torch.randn(1, arch.kv_heads, n, arch.head_dim, device=device, dtype=dtype)

    def run() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)

    return 4 * arch.heads * arch.head_dim * (n * (n + 1) / 2) / timed(run, device, repeats)


def decode_attn_bw(arch: Arch, device: torch.device, dtype: torch.dtype, batch: int, kv: int, repeats: int) -> float:
    q = torch.randn(batch, arch.heads, 1, arch.head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, arch.kv_heads, kv, arch.head_dim, device=device, dtype=dtype)

    def run() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, k, enable_gqa=True)

    return 2 * batch * kv * arch.kv_heads * arch.head_dim * k.element_size() / timed(run, device, repeats)


def measure(arch: Arch, device: str = "cuda", small: bool = False, repeats: int = 10) -> dict[str, float]:
    """Measured rates of one layer's operators (the cost model multiplies by layers)."""
    from kvbench.serve.copybench import measure as copies

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sizes = ((64, 256), 256, (4, 512)) if small else ((512, 2048, 8192), 8192, (64, 4096))
    copy = copies(block_bytes=16 * arch.kv_bytes_per_token_layer, n_blocks=256 if small else 2048,
                  device=device)
    bw = decode_attn_bw(arch, dev, dtype, *sizes[2], repeats)
    return {"gemm_flops": gemm_flops(arch, dev, dtype, sizes[0], repeats),
            "attn_flops": prefill_attn_flops(arch, dev, dtype, sizes[1], repeats),
            "attn_bw": bw, "weight_bw": bw, "pcie_bw": copy.bw, "copy_call_s": copy.call_s}


def calibration(base: dict[str, Any], arch: Arch, device: str = "cuda", small: bool = False) -> dict[str, Any]:
    """A calibration file's content: the profile's values with the measured rates in their place."""
    rates = measure(arch, device, small)
    return {"hardware": {**base, **rates}, "measured": rates, "device": device,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "arch": arch.name, "note": "fixed_s, per_seq_s, page_map_s, nvlink_bw: the profile's assumptions",
            "spread": float(np.std(list(rates.values())) if rates else 0.0)}

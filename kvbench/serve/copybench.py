"""Scattered vs grouped KV copies, measured on this machine (FastSwitch's context-switch cost).

A pool of KV blocks (one 16-token block of one layer's K is ``16 * kv_heads * head_dim * dtype`` bytes) is copied
to a second buffer either block by block from scattered ids (one copy call per block, vLLM's swap) or in
contiguous groups of ``g`` blocks (FastSwitch's block groups); each time is the fastest of ``repeats``. Fitting
``t = calls * c + bytes / bw`` over the measurements (the same bytes each time, so the caches play the same part)
gives the per-call cost ``c`` and the bandwidth ``bw`` that
the cost model uses for swaps. On CPU this is host memcpy through ``Tensor.copy_``; on a GPU the same code copies
device blocks into pinned host memory, i.e. measures PCIe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class CopyFit:
    call_s: float
    bw: float  # bytes / s
    rows: tuple[tuple[int, int, float], ...]  # (calls, bytes, seconds) measured

    def predict(self, calls: int, nbytes: int) -> float:
        return calls * self.call_s + nbytes / self.bw


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, ids: list[int], group: int) -> int:
    """Copy blocks ``ids`` of src (n_blocks, block_elems) into dst in order; group > 1 copies contiguous runs of
    ``group`` blocks per call. Returns the number of calls."""
    calls = 0
    for i in range(0, len(ids), group):
        j = ids[i]
        dst[i:i + group].copy_(src[j:j + group])
        calls += 1
    return calls


def time_copy(src: torch.Tensor, dst: torch.Tensor, ids: list[int], group: int, repeats: int) -> tuple[int, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        calls = copy_blocks(src, dst, ids, group)
        if src.is_cuda or dst.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return calls, min(times)  # noise on a shared machine only adds time: the fastest repeat is the cost


def measure(block_bytes: int = 32768, n_blocks: int = 1024, groups: tuple[int, ...] = (1, 4, 16, 64),
            repeats: int = 7, seed: int = 0, device: str = "cpu") -> CopyFit:
    """Copy ``n_blocks`` blocks per measurement: scattered singles (group 1, random ids) and contiguous groups.
    One intra-op thread, as kvbench runs (a multi-threaded copy_ spins badly on an oversubscribed machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(block_bytes, n_blocks, groups, repeats, seed, device)
    finally:
        torch.set_num_threads(threads)


def _measure(block_bytes: int, n_blocks: int, groups: tuple[int, ...], repeats: int, seed: int,
             device: str) -> CopyFit:
    elems = block_bytes // 4
    pool = torch.randn(4 * n_blocks, elems)
    src = pool.to(device)
    dst = torch.zeros(n_blocks, elems, pin_memory=device != "cpu")  # touched: no page faults while timing
    copy_blocks(src, dst, list(range(n_blocks)), n_blocks)  # warm-up
    rng = np.random.default_rng(seed)
    rows = []
    for g in groups:  # the same bytes in every measurement (one cache regime), only the number of calls varies
        starts = rng.choice(4 * n_blocks // g, n_blocks // g, replace=False) * g
        ids = [int(s) + k for s in starts for k in range(g)]
        calls, t = time_copy(src, dst, ids, g, repeats)
        rows.append((calls, n_blocks * block_bytes, t))
    a = np.array([[c, b] for c, b, _ in rows], dtype=float)
    y = np.array([t for *_, t in rows])
    w = 1 / y  # relative errors
    coef, *_ = np.linalg.lstsq(a * w[:, None], y * w, rcond=None)
    call_s, inv_bw = (max(float(coef[0]), 1e-9), max(float(coef[1]), 1e-13))
    return CopyFit(call_s, 1 / inv_bw, tuple(rows))

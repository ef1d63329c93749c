"""Small tensor operations shared by the methods: pooling, GQA group reduction, top-k selection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kvbench.errors import UsageError


def pool1d(x: Tensor, kernel: int, mode: str = "avg") -> Tensor:
    """Smooth scores along the last (key) axis with stride 1 and padding kernel//2.

    ``avg`` uses zero padding with count_include_pad (edge values divided by the full kernel), ``max`` pads with
    -inf, exactly as ``F.avg_pool1d`` / ``F.max_pool1d`` do in the authors' code. kernel <= 1 returns x unchanged.
    x: (..., m) -> (..., m).
    """
    if kernel <= 1 or mode == "none":
        return x
    if kernel % 2 == 0:
        raise UsageError(f"pooling kernel must be odd to keep the length, got {kernel}")
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])  # (B, 1, m)
    if mode == "avg":
        out = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    elif mode == "max":
        out = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        raise UsageError(f"unknown pooling {mode!r}: use 'avg', 'max' or 'none'")
    return out.reshape(shape)


def group_reduce(x: Tensor, n_kv_heads: int, how: str = "mean") -> Tensor:
    """Combine the G query heads of each KV head: (H_q, ...) -> (H_kv, ...), with mean, max or sum."""
    g = x.shape[0] // n_kv_heads
    grouped = x.reshape(n_kv_heads, g, *x.shape[1:])  # (H_kv, G, ...); query head i belongs to KV head i // G
    if how == "mean":
        return grouped.mean(1)
    if how == "max":
        return grouped.amax(1)
    if how == "sum":
        return grouped.sum(1)
    raise UsageError(f"unknown GQA reduction {how!r}: use 'mean', 'max' or 'sum'")


def topk_per_head(scores: Tensor, counts: Tensor) -> list[Tensor]:
    """Indices of the ``counts[h]`` highest scores of each row. scores (H, m), counts (H,) -> H index tensors."""
    if counts.numel() == 0 or int(counts.max()) == 0:
        return [scores.new_zeros(0, dtype=torch.long) for _ in range(scores.shape[0])]
    order = scores.float().argsort(dim=-1, descending=True, stable=True)  # (H, m); ties -> lower index first
    return [order[h, : int(c)] for h, c in enumerate(counts.tolist())]

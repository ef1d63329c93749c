"""SnapKV: observation-window attention, pooled, per KV head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvbench.engine.context import LayerContext
from kvbench.errors import UsageError
from kvbench.method import Method
from kvbench.ops import group_reduce, pool1d


@dataclass
class SnapKV(Method):
    """SnapKV (https://arxiv.org/abs/2404.14469), methods_core §1.1 and §2.4.

    score[h, j] = pool_k( reduce_i A[q, i, j] ) over the last ``window`` queries, with the G query heads of each KV
    head combined by ``gqa`` *before* pooling; top tokens per KV head plus the window are kept.

    Defaults are the SnapKV/AdaKV repos' LongBench settings: window 32, max-pooling with kernel 7, mean over the
    window (the same ranking as KVCache-Factory's sum), GQA mean before pooling (AdaKV's ``--gqa_support``). Other
    repos differ (KVCache-Factory LongBench: window 8; kvpress: avg-pool 5 and mean over the group after pooling);
    set the fields to reproduce them.

    Deviation: the cache is per KV head. KVCache-Factory (legacy) and the AdaKV repo by default select per *query*
    head on a repeat_kv-expanded cache, which holds G times the memory.

    Parameters:
        window: observation window (also always kept). kernel: pooling kernel (odd). pooling: 'max' | 'avg' | 'none'.
        reduce: 'mean' | 'sum' over window queries. gqa: 'mean' | 'max' | 'sum' over the query group.
    """

    name: str = "snapkv"
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    reduce: str = "mean"
    gqa: str = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        pool1d(torch.zeros(1, 8), self.kernel, self.pooling)  # validates kernel and pooling with a clear message
        group_reduce(torch.zeros(1, 1), 1, self.gqa)
        if self.reduce not in ("mean", "sum"):
            raise UsageError(f"reduce={self.reduce!r}; use 'mean' or 'sum'")

    def score(self, ctx: LayerContext) -> Tensor:
        attn = ctx.window_attention()  # (H_q, w, n - w)
        s = attn.sum(1) if self.reduce == "sum" else attn.mean(1)  # (H_q, n - w)
        return pool1d(ctx.group(s, self.gqa), self.kernel, self.pooling)  # (H_kv, n - w)

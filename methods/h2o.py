"""H2O (one-shot prefill variant): accumulated attention over all prompt queries."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvbench.engine.context import LayerContext
from kvbench.method import Method


@dataclass
class H2O(Method):
    """Heavy-hitter oracle as KVCache-Factory runs it (https://arxiv.org/abs/2306.14048), methods_core §2.3.

    score[h, j] = sum over *all* n prompt queries of the causal attention on key j (no pooling), for j < n - w;
    top (B - w) plus the last w tokens are kept, once, at prefill (no rolling eviction while decoding).

    Defaults: window 8 (KVCache-Factory LongBench). The attention is fully causal: KVCache-Factory's legacy code
    masked only the last w x w block, letting early rows see future keys; that bug was fixed upstream in 2026 and is
    not reproduced. Deviation: per KV head with the query group combined by ``gqa`` (KVCache-Factory's ``kv_head``
    mode; its legacy default is a per-query-head cache with G times the memory).
    """

    name: str = "h2o"
    window: int = 8
    gqa: str = "mean"

    def score(self, ctx: LayerContext) -> Tensor:
        colsum = ctx.attention_column_sums()  # (H_q, n)
        return ctx.group(colsum[:, : ctx.n - ctx.window], self.gqa)  # (H_kv, n - w)

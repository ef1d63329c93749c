"""The compression hook of the VAR runner: after every scale step, each block's cache is cut to the budget.

A VAR method (``VarMethod``) sees one ``ScaleContext`` per block (our own small dataclass, the VAR counterpart of
``kvbench.engine.context.LayerContext``: rows are CFG streams x heads, and it adds the step, the scale schedule and
the scale of every cached token). It answers *which* tokens (``score``: higher = keep) and may decide *how many*
per row (``counts``; default: every row keeps ``keep``). ``compress_step`` then keeps each row's top tokens in
kvbench's store.

Budget: after step s the cache has seen L_s = sum_{t <= s} pn_t^2 tokens per row; each row keeps on average
``keep = tokens_per_head(budget, L_s)`` (floor(budget L_s) for budget <= 1, else min(budget, L_s) tokens), as the
text engine's block-wise prefill does after each block. The current scale attended with the full cache of the
step (its own keys included); compression happens after every block has run the step, so cross-block allocators
(CAKE) see every block. A row that holds no more than its count is left untouched, so a budget covering every
token gives bit-identical generations.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvbench.budget import tokens_per_head
from kvbench.var.cache import VarKVCache, padded


@dataclass
class ScaleContext:
    """One block's cache at the end of a scale step. R = streams x heads rows (row = stream * H + head);
    n = the longest row; entries past a row's length are padding (``valid`` False, ``positions`` -1).

    Attributes:
        queries: (R, q, d) the current scale's queries as the model attended with them (normalised and scaled).
        keys, values: (R, n, d) the row's cached entries (the current scale's included), in token order.
        positions: (R, n) index of every entry in VAR's flattened token sequence (scale-major, row-major).
        scale: softmax scale (1 with l2-normalised attention).
        keep: average entries per row this step's budget allows.
        spans: token ranges of the condition and of every scale (``kvbench.var.cache.scale_spans``).
        memo: scratch space shared by the method's ``score`` and ``counts`` for this block and step.
        state: per-block state that persists across the steps of one generation (H2O's accumulated attention).
    """

    block_idx: int
    n_blocks: int
    step: int
    patch_nums: tuple[int, ...]
    n_streams: int
    n_heads: int
    queries: Tensor
    keys: Tensor
    values: Tensor
    positions: Tensor
    valid: Tensor
    scale: float
    keep: int
    spans: dict[str, tuple[int, int]]
    memo: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.keys.shape[1]

    @property
    def lens(self) -> Tensor:
        return self.valid.sum(1)

    @property
    def current(self) -> tuple[int, int]:
        """Token range of the scale this step generated."""
        return self.spans[f"scale_{self.step}"]

    def attention(self) -> Tensor:
        """(R, q, n) fp32 attention probabilities of the current queries over the row's entries (0 on padding)."""
        if "attention" not in self.memo:
            logits = torch.einsum("rqd,rnd->rqn", self.queries.float(), self.keys.float()) * self.scale
            self.memo["attention"] = logits.masked_fill(~self.valid[:, None], float("-inf")).softmax(-1)
        return self.memo["attention"]

    def mass(self) -> Tensor:
        """(R, n) attention each entry receives, summed over the current scale's queries."""
        return self.attention().sum(1)

    def token_scale(self) -> Tensor:
        """(R, n) scale index of every entry (-1 on padding)."""
        starts = torch.tensor([self.spans[f"scale_{i}"][1] for i in range(len(self.patch_nums))],
                              device=self.positions.device)
        return torch.where(self.valid, torch.bucketize(self.positions, starts, right=True), -1)

    def masked(self, scores: Tensor) -> Tensor:
        """Scores in float64 (lexicographic scores add large offsets to attention masses) with padding at -inf."""
        return scores.double().masked_fill(~self.valid, float("-inf"))


class VarMethod(ABC):
    """Which tokens a VAR method keeps (``score``) and, optionally, how many per row (``counts``)."""

    compresses: ClassVar[bool] = True

    @abstractmethod
    def score(self, ctx: ScaleContext) -> Tensor:
        """(R, n) scores, higher = keep; padding is ignored."""

    def counts(self, ctxs: list[ScaleContext], keep: int) -> list[Tensor]:
        """Per block, (R,) entries each row keeps: ``keep`` for every row (clamped to the row's length)."""
        return [torch.clamp(ctx.lens, max=keep) for ctx in ctxs]


def contexts(cache: VarKVCache, scale: float, keep: int, states: list[dict]) -> list[ScaleContext]:
    """A ``ScaleContext`` for every block of the cache at the end of its current step."""
    out = []
    for b, layer in enumerate(cache.layers):
        k, v, pos, valid = padded(layer)
        out.append(ScaleContext(b, cache.n_blocks, cache.step, cache.patch_nums, cache.n_streams, cache.n_heads,
                                cache.queries[b], k, v, pos, valid, scale, keep, cache.spans, state=states[b]))
    return out


def select_top(ctx: ScaleContext, scores: Tensor, counts: Tensor) -> list[Tensor] | None:
    """Within-row indices of each row's top ``counts[r]`` entries; None when no row loses anything."""
    lens = ctx.lens
    if bool((counts >= lens).all()):
        return None
    scores = ctx.masked(scores)
    order = scores.argsort(dim=1, descending=True, stable=True)  # ties: earlier entries first
    return [order[r, : int(min(counts[r], lens[r]))] for r in range(len(lens))]


def compress_step(cache: VarKVCache, method: VarMethod, budget: float, scale: float, states: list[dict]) -> None:
    """Cut every block's cache to the budget after a scale step (no-op for non-compressing methods)."""
    if not method.compresses:
        return
    keep = tokens_per_head(budget, cache.tokens_seen())
    ctxs = contexts(cache, scale, keep, states)
    for ctx, counts in zip(ctxs, method.counts(ctxs, keep), strict=True):
        kept = select_top(ctx, method.score(ctx), counts)
        if kept is not None:
            cache.layers[ctx.block_idx].select(kept)

"""Budgets and allocators: *how many* tokens each layer and KV head keeps, separate from *which* (the method).

``budget`` (a top-level config number): <= 1 is the fraction of KV entries kept (1.0 = no compression), > 1 is the
average number of tokens kept per KV head, window included (the AdaKV/KVCache-Factory "B"). ``tokens_per_head``
turns it into the per-head average for a cache of n tokens. kvpress's ``compression_ratio`` is ``1 - budget``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from kvbench.errors import UsageError
from kvbench.validate import check_budget  # noqa: F401  (the one budget check, torch-free; re-exported here)

if TYPE_CHECKING:  # the engine's context imports nothing from here, but keep the dependency one-way at run time
    from kvbench.engine.context import LayerContext


def tokens_per_head(budget: float, n: int) -> int:
    """Average tokens kept per KV head (window included) for a cache of n tokens; never more than n, at least 1.

    Fractions use floor(budget * n) as kvpress does (int(n * (1 - compression_ratio))).
    """
    if budget <= 1:
        return max(1, min(n, math.floor(budget * n + 1e-9)))
    return min(n, int(budget))


def default_decode_budget(budget: float, n: int, window: int) -> tuple[int, int] | None:
    """(candidates, window) per KV head a layer holds while decoding, for methods that evict at decode time (CAKE),
    before (or without) any prefill compression: C - w and w with C the per-head budget, window included.

    A token budget (> 1) is C itself even when the prompt of n tokens is shorter (its cache grows to C while
    decoding, then stays there, as CAKE records C - w for every layer it did not compress); a fraction < 1 gives
    C = floor(budget * n) of the prompt, as ``tokens_per_head``; budget 1.0 is no compression, hence None.
    """
    if budget == 1:
        return None
    c = int(budget) if budget > 1 else tokens_per_head(budget, n)
    w = min(window, c)
    return c - w, w


def compression_ratio(budget: float, n: int | None = None) -> float:
    """kvpress convention: the fraction removed. For token budgets (> 1) it needs the cache length n."""
    if budget <= 1:
        return 1.0 - budget
    return 1.0 - min(1.0, budget / n) if n else float("nan")


@dataclass
class Allocator:
    """Splits a layer's non-window budget over its KV heads (and, for some allocators, over layers).

    ``allocate(scores, keep, layer, n_layers, ctx)``: scores (H, m) of the m candidate (non-window) tokens, ``keep``
    the average number of candidates to keep per head in an average layer; returns (H,) counts, each <= m. ``ctx``
    is the layer's ``LayerContext``: an allocator that pairs with a method (e.g. Task-KV's head split) reads what the
    method left in ``ctx.memo``.
    """

    name: str = "uniform"

    equal_heads: ClassVar[bool] = True  # every KV head of a layer keeps the same number (the layer stays dense)
    cross_layer: ClassVar[bool] = False  # True: budgets depend on other layers (``CrossLayerAllocator.plan``)
    # True when a layer's counts come from that layer's own scores alone, so that one prefill can be forked into
    # several budgets (``budget=[...]``, kvbench.sweep); allocators that plan across layers set it False.
    shares_prefill: ClassVar[bool] = True

    def check_method(self, method: object) -> None:
        """Refuse, before a run starts, a method this allocator cannot pair with (one that reads what a particular
        method leaves in ``ctx.memo``); every method by default."""
        return None

    def allocate(self, scores: Tensor, keep: int, layer: int, n_layers: int,
                 ctx: LayerContext | None = None) -> Tensor:
        h, m = scores.shape
        return torch.full((h,), min(keep, m), dtype=torch.long)


@dataclass
class Uniform(Allocator):
    """Every layer and every KV head keeps the same number of tokens (SnapKV, H2O, StreamingLLM)."""

    name: str = "uniform"


@dataclass
class Pyramid(Allocator):
    """PyramidKV's arithmetic layer schedule (https://arxiv.org/abs/2406.02069), methods_core §2.5.

    With base b = keep: m_min = b // beta, m_max = 2b - m_min; if m_max >= m (the candidates) then m_max = m and
    m_min = 2b - m_max; step = (m_max - m_min) // (L - 1); layer l keeps m_max - l * step (floored step, so the total
    can exceed L * b slightly, as in the authors' code). ``kvf_fallback`` reproduces KVCache-Factory's rule of
    falling back to the uniform b when the whole prompt is short, ``q_len < (max_capacity_prompt - window_size) * 2``
    (``PyramidKVCluster.update_kv``): n < 2b with n = ``ctx.n`` the layer's tokens *including* the window (the
    candidates m = n - w are not what it compares; without a ``ctx`` n = m). The AdaKV/CompressKV ports have no such
    rule; default off.
    Every head of a layer keeps the same number. The schedule is recomputed for every prompt: the AdaKV/CompressKV
    ports compute it once from the first sample and reuse it (a stale-state bug that matters only when the clamp
    is active); that is not reproduced.
    """

    name: str = "pyramid"
    beta: int = 20
    kvf_fallback: bool = False

    def allocate(self, scores: Tensor, keep: int, layer: int, n_layers: int,
                 ctx: LayerContext | None = None) -> Tensor:
        h, m = scores.shape
        b = min(keep, m)
        n = ctx.n if ctx is not None else m  # the prompt length q_len, window included
        if n_layers == 1 or (self.kvf_fallback and n < 2 * b):
            return torch.full((h,), b, dtype=torch.long)
        m_min = b // self.beta
        m_max = 2 * b - m_min
        if m_max >= m:
            m_max, m_min = m, 2 * b - m
        step = (m_max - m_min) // (n_layers - 1)
        return torch.full((h,), max(0, min(m, m_max - layer * step)), dtype=torch.long)


@dataclass
class HeadAdaptive(Allocator):
    """AdaKV's head-wise budgets within a layer (https://arxiv.org/abs/2407.11550), methods_core §2.6.

    The layer's H * keep candidates are chosen by one top-k over all heads' scores; how each head is protected from
    losing everything depends on ``safeguard``:

    * ``ffy0`` (FFY0/AdaKV ``AdaptiveSnapKVCluster``): a_h = picks in head h; cap_h = round(a_h * (1 - alpha) +
      floor(alpha * keep)) (torch.round, half to even), clamped to the m candidates. The layer total can differ
      from H * keep by rounding.
    * ``kvpress`` (NVIDIA/kvpress ``AdaKVPress.compress``, the "AdaKV" baseline of the DefensiveKV paper): with
      n_kept = keep + w the per-head budget *including* the window (w = ``ctx.n - m``, 0 without a ``ctx``),
      n_safe = int(alpha * n_kept) tokens of every head are forced; the window comes first among them (kvpress pads
      it with the maximum score), so the top max(0, n_safe - w) candidates of every head are forced, then one global
      top-k fills the layer to exactly H * keep candidates. The layer total is exact.

    alpha = 0.2 is both repos' default (AdaKV's LongBench ``floor_alpha``, kvpress's ``alpha_safeguard``); alpha = 0
    is DefensiveKV's plain flattened top-k under either rule. ``normalize`` (KVCache-Factory's port; off in the AdaKV
    repo) rescales head h's scores by its top-keep mass before either rule.
    """

    name: str = "head_adaptive"
    alpha: float = 0.2
    normalize: bool = False
    safeguard: str = "ffy0"

    equal_heads: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.safeguard not in ("ffy0", "kvpress"):
            raise UsageError(f"safeguard={self.safeguard!r}; use 'ffy0' (the AdaKV repo) or 'kvpress' (AdaKVPress)")
        if not 0 <= self.alpha <= 1:
            raise UsageError(f"alpha must be in [0, 1], got {self.alpha!r}")

    def allocate(self, scores: Tensor, keep: int, layer: int, n_layers: int,
                 ctx: LayerContext | None = None) -> Tensor:
        h, m = scores.shape
        keep = min(keep, m)
        s = scores.float()
        if self.normalize:
            top = s.topk(keep, dim=-1).values.sum(-1, keepdim=True)  # (H, 1)
            s = s * top / s.sum(-1, keepdim=True).clamp_min(1e-12)
        if self.safeguard == "kvpress":
            window = ctx.n - m if ctx is not None else 0
            return kvpress_counts(s, keep, max(0, int((keep + window) * self.alpha) - window))
        picks = s.reshape(-1).topk(h * keep).indices // m  # (H*keep,) head of every pick
        counts = torch.bincount(picks, minlength=h).float()  # (H,)
        caps = torch.round(counts * (1 - self.alpha) + math.floor(self.alpha * keep))
        return caps.clamp(0, m).long()


def kvpress_counts(scores: Tensor, keep: int, forced: int) -> Tensor:
    """kvpress's AdaKV counts: every head's top-``forced`` candidates, then the layer's best others up to H * keep.

    scores (H, m) -> (H,) counts. Per head the forced tokens are its best, so a count is always a prefix of the
    head's own ranking (what ``topk_per_head`` keeps).
    """
    h, m = scores.shape
    top = scores.topk(min(forced, keep), dim=-1).indices  # (H, forced)
    lifted = scores.scatter(-1, top, float("inf"))  # forced tokens outrank everything
    picks = lifted.reshape(-1).topk(h * keep).indices // m  # (H*keep,)
    return torch.bincount(picks, minlength=h)


@dataclass
class LayerScores:
    """One scored layer waiting for a cross-layer allocation.

    Attributes:
        scores: (H, m) scores of the layer's m candidate tokens (the first m of every head, in cache order).
        n: tokens per head in the layer (the n - m trailing ones are always kept).
        stats: per-layer scalars the method left in ``ctx.stats`` (e.g. CAKE's preference).
        pad: (H,) leading padding columns of a ragged layer's view (scores -inf there), or None when uniform.
    """

    scores: Tensor
    n: int
    stats: dict
    pad: Tensor | None = None


@dataclass
class CrossLayerAllocator(Allocator):
    """Allocates over layers: the engine scores each layer, then asks ``plan`` for every scored layer's counts.

    ``plan(layers, keep, n_layers)``: ``layers`` maps layer index -> ``LayerScores`` for the layers scored so far
    (all of them, unless the method cascades); ``keep`` is the average tokens per KV head, window included. Returns
    layer index -> (H,) candidate counts. The engine calls it after the last layer, or after every layer when the
    method sets ``cascading`` (then earlier layers are re-trimmed, each within its previous selection).
    """

    name: str = "cross_layer"

    cross_layer: ClassVar[bool] = True
    shares_prefill: ClassVar[bool] = False  # counts depend on other layers' scores: budget sweeps run one by one

    def plan(self, layers: dict[int, LayerScores], keep: int, n_layers: int) -> dict[int, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} is a cross-layer allocator and must define plan()")

    def allocate(self, scores: Tensor, keep: int, layer: int, n_layers: int,
                 ctx: LayerContext | None = None) -> Tensor:
        raise UsageError(f"allocator {self.name!r} allocates across layers; the engine calls its plan()")


@dataclass
class GlobalFlat(CrossLayerAllocator):
    """One top-k over every (layer, head, token) score of the model: Layer-DefensiveKV's allocation (methods_core §5.2).

    K = L * H * keep entries (window included when the method scores the window, as Layer-DefensiveKV does); layer l
    head h keeps its number of picks, which a per-head top-k then reproduces. Scores of different layers compete
    directly, so a layer with a small score scale can lose tokens, its window or whole heads, as in the authors'
    code. Ties at the threshold are broken by ``torch.topk``.
    """

    name: str = "global_flat"

    equal_heads: ClassVar[bool] = False

    def plan(self, layers: dict[int, LayerScores], keep: int, n_layers: int) -> dict[int, Tensor]:
        order = sorted(layers)
        flat = torch.cat([layers[i].scores.float().reshape(-1) for i in order])  # (sum_l H * m_l,)
        total = sum(layers[i].scores.shape[0] * (keep - (layers[i].n - layers[i].scores.shape[1])) for i in order)
        picks = torch.zeros_like(flat, dtype=torch.bool)
        picks[flat.topk(min(max(total, 0), flat.numel())).indices] = True
        out, start = {}, 0
        for i in order:
            h, m = layers[i].scores.shape
            out[i] = picks[start : start + h * m].reshape(h, m).sum(-1)  # (H,) picks per head
            start += h * m
        return out

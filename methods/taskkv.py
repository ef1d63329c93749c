"""Task-KV: heterogeneous heads keep the full cache, the others sinks + recent tokens + middle activations."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from kvbench.budget import Allocator
from kvbench.engine.context import LayerContext
from kvbench.errors import UsageError
from kvbench.method import Method
from kvbench.ops import group_reduce, pool1d

MEMO = "taskkv"  # ctx.memo key: what TaskKV.score leaves for TaskKVAllocator (and for analysis)
NEEDS_TASKKV = "allocator=taskkv needs method=taskkv (it splits heads by the semantic distances TaskKV.score computes)"


def sparsify(v: Tensor, top_t: int) -> Tensor:
    """Keep the top_t entries of every row, zero the rest: (H, m) -> (H, m). top_t <= 0 or >= m keeps all."""
    if top_t <= 0 or top_t >= v.shape[-1]:
        return v
    idx = v.topk(top_t, dim=-1).indices  # (H, t)
    return torch.zeros_like(v).scatter_(-1, idx, v.gather(-1, idx))


def semantic_distance(vectors: Tensor, metric: str = "l2") -> Tensor:
    """Distance of every head's semantic vector from the centre (their mean): (H, m) -> (H,).

    ``l2``: ||v_h - c||_2. ``cosine``: 1 - cos(v_h, c) (0 for a zero vector).
    """
    centre = vectors.mean(0, keepdim=True)  # (1, m)
    if metric == "l2":
        return (vectors - centre).norm(dim=-1)
    if metric == "cosine":
        return 1 - torch.nn.functional.cosine_similarity(vectors, centre, dim=-1, eps=1e-12)
    raise UsageError(f"distance={metric!r}; use 'l2' or 'cosine'")


@dataclass
class TaskKV(Method):
    """Task-KV (He, Liu, Chen 2025, https://arxiv.org/abs/2501.15113); no public code, reconstructed from the paper.

    From the paper (abstract [A]; the method section and tables could not be retrieved, methods_more §2): heads far
    from the *semantic centre* ("heterogeneous heads") keep the full KV cache; every other head keeps attention
    sinks, a few recent tokens and *middle activations*; a *semantic separator* picks the heterogeneous heads
    dynamically per input from their distances to the centre. Everything below marked [R] is our reconstruction.

    Per layer, on the last ``window`` prompt queries (SnapKV's observation window, fp32 softmax over all keys,
    window columns dropped, ``LayerContext.window_attention``):

    1. Semantic vector of query head i: v_i = column mean of its window attention over the n - w non-window keys
       (third-party summaries [S]: "column average of the attention weights"), sparsified to its ``top_t``
       largest entries, the rest set to 0 ([S]: sparsified to cut the cost; t = 64 is [R]).
    2. Semantic centre c = mean of the layer's v_i ([R]: per layer, because attention scales differ between layers;
       a model-wide centre is also impossible here, since later layers have not run when a layer is compressed).
       Distance d_i = ||v_i - c||_2 (``distance: l2``, [R]) or 1 - cos(v_i, c) (``cosine``).
    3. GQA [R]: our cache is per KV head, so a KV head's distance is ``gqa`` (default ``max``) over its G query
       heads' distances: a KV head is as heterogeneous as its most distinctive query head, whose full context its
       cache must then serve. (Averaging the G attention maps first would make the 2 KV heads of a
       2-KV-head layer exactly equidistant under L2.) With ``cache: query_head`` G = 1 and the split is per query
       head, as a per-query-head implementation of the paper would do.
    4. Middle activations [R]: the tokens of [n_sink, n - w) with the largest GQA-mean column-mean attention (the
       unsparsified v, optionally smoothed with ``pooling``/``kernel``; default none), i.e. the tokens the
       non-heterogeneous heads' window queries aggregate most.

    ``score`` returns (H_kv, n - w): sinks outrank every middle token (earlier sinks first), middle tokens are
    ranked by step 4; the last w tokens (recent tokens r = w) are always kept by the engine. It leaves in
    ``ctx.memo["taskkv"]`` the KV-head distances and the sink/middle sizes; the ``taskkv`` allocator (selected by
    ``conf/method/taskkv.yaml``, documented there) turns them into the head split and per-head counts, and records
    the heterogeneous heads. With another allocator the method is plain sinks + recent + top middle.

    Further choices [R]: the r recent tokens and the observation window are one parameter (``window``), as in
    SnapKV; decoding appends every new token to every head (no decode-time eviction); block-wise prefill
    (``prefill_chunk``) is refused because heads end up with different lengths. Measured on kvbench-tiny
    (``synth_multikey_dense``, query-aware, 32 questions): 15.6 / 34.4 / 50.0 / 50.0 / 100 % at budget
    0.05 / 0.1 / 0.2 / 0.5 / 0.7. Below about 0.6 no full head fits among the 2 KV heads, and raw middle activations
    keep the token the query attends to but not the answer tokens after it (SnapKV without pooling scores the same
    50 % at 0.2 and 0.5); ``pooling: max, kernel: 7`` (SnapKV's neighbourhood) gives 100 % at 0.1-0.5.

    Parameters (all [R]: the paper's values were not retrievable; methods_more §2 suggestions):
        window: observation window w, also the r recent tokens every head keeps (32). n_sink: s attention sinks (4).
        n_middle: m middle activations per non-heterogeneous head (32). top_t: semantic-vector sparsity (64; <= 0
        = dense). distance: 'l2' | 'cosine'. gqa: 'max' | 'mean' over a KV head's query-head distances.
        pooling, kernel: smoothing of the middle-activation scores ('none'/1 = raw attention).
    """

    name: str = "taskkv"
    window: int = 32
    n_sink: int = 4
    n_middle: int = 32
    top_t: int = 64
    distance: str = "l2"
    gqa: str = "max"
    pooling: str = "none"
    kernel: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1 or self.n_sink < 0 or self.n_middle < 0:
            raise UsageError(f"taskkv needs window >= 1, n_sink >= 0, n_middle >= 0; got window={self.window}, "
                             f"n_sink={self.n_sink}, n_middle={self.n_middle}")
        semantic_distance(torch.zeros(1, 2), self.distance)
        group_reduce(torch.zeros(1), 1, self.gqa)
        pool1d(torch.zeros(1, 8), self.kernel, self.pooling)
        pool1d(torch.zeros(1, 8), 3, self.pooling)  # the mode too, even with kernel 1

    def score(self, ctx: LayerContext) -> Tensor:
        col = ctx.window_attention().float().mean(1)  # (H_q, n - w) semantic vectors before sparsification
        dist_q = semantic_distance(sparsify(col, self.top_t), self.distance)  # (H_q,)
        dist = ctx.group(dist_q, self.gqa)  # (H_kv,)
        mid = pool1d(ctx.group(col, "mean"), self.kernel, self.pooling)  # (H_kv, n - w) middle-activation scores
        s = min(self.n_sink, mid.shape[-1])
        scores = mid.clone()
        scores[:, :s] = 2.0 + torch.arange(s, 0, -1, device=mid.device, dtype=mid.dtype)  # sinks above any prob.
        ctx.memo[MEMO] = {"distance": dist, "distance_query_heads": dist_q, "n_sink": s, "n_middle": self.n_middle}
        return scores


def fit_heterogeneous(h: int, candidates: int, keep: int, base: int) -> int:
    """Largest k <= h with k * candidates + (h - k) * base <= h * keep (full heads + base-sized heads fit)."""
    if candidates <= base:
        return h
    return max(0, min(h, math.floor(h * (keep - base) / (candidates - base))))


@dataclass
class TaskKVAllocator(Allocator):
    """Task-KV's semantic separator and per-head counts (pairs with ``method=taskkv``, reads ``ctx.memo``).

    Per layer with H KV heads, M non-window candidates per head, a per-head candidate budget K (= kvbench's
    ``keep`` minus the window, so the layer total H * K matches every other method at the same ``budget``) and
    the method's s sinks and m middle activations:

    * base size of a non-heterogeneous head: b = s' + m' with s' = min(s, K), m' = min(m, K - s'): when s + r + m
      does not fit the per-head budget, r (the window, clamped by the engine first) wins, then sinks, then middle
      activations [R] (deterministic; at tiny budgets Task-KV degrades to recent tokens, like every windowed
      method here).
    * k_fit = the largest k with k * M + (H - k) * b <= H * K: how many full heads the budget can afford [R].
    * ``count: budget`` [R]: k = k_fit, the k heads farthest from the centre. ``count: threshold`` [R]: the heads
      with d > mean(d) + lam * std(d) (population std), the farthest k_fit of them if more. Ties: lower head first.
    * ``redistribute: true`` [R]: the leftover H * K - k * M - (H - k) * b goes to the non-heterogeneous heads' middle
      activations, split evenly (the remainder one each to the heads farthest from the centre), so the layer holds
      exactly H * K like the other methods; ``false`` keeps b and under-spends the budget (the paper's fixed
      s + r + m).

    The heterogeneous heads of the last compressed prompt are recorded per layer in ``heterogeneous``
    ({layer: [KV heads]}) and in ``ctx.memo["taskkv"]["heterogeneous"]`` ((H,) bool).
    """

    name: str = "taskkv"
    count: str = "budget"
    lam: float = 1.0
    redistribute: bool = True
    heterogeneous: dict[int, list[int]] = field(default_factory=dict, repr=False)

    equal_heads: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.count not in ("budget", "threshold"):
            raise UsageError(f"count={self.count!r}; use 'budget' or 'threshold'")

    def check_method(self, method: Method) -> None:
        """Called by the runner before a run directory is claimed: only TaskKV leaves the distances in ctx.memo."""
        if not isinstance(method, TaskKV):
            raise UsageError(NEEDS_TASKKV)

    def allocate(self, scores: Tensor, keep: int, layer: int, n_layers: int,
                 ctx: LayerContext | None = None) -> Tensor:
        memo = ctx.memo.get(MEMO) if ctx is not None else None
        if memo is None:
            raise UsageError(NEEDS_TASKKV)
        h, cand = scores.shape
        keep = min(keep, cand)
        s = min(memo["n_sink"], keep)
        base = s + min(memo["n_middle"], keep - s)
        k = fit_heterogeneous(h, cand, keep, base)
        dist = memo["distance"].float().cpu()  # (H,)
        order = dist.argsort(descending=True, stable=True)  # farthest first, ties -> lower head
        if self.count == "threshold":
            above = int((dist > dist.mean() + self.lam * dist.std(correction=0)).sum())
            k = min(k, above)
        counts = torch.full((h,), base, dtype=torch.long)
        counts[order[:k]] = cand
        normal = order[k:]
        if self.redistribute and len(normal):
            left = h * keep - k * cand - len(normal) * base
            counts[normal] += left // len(normal)
            counts[normal[: left % len(normal)]] += 1
        mask = torch.zeros(h, dtype=torch.bool)
        mask[order[:k]] = True
        memo["heterogeneous"] = mask
        self.heterogeneous[layer] = sorted(order[:k].tolist())
        return counts.clamp(0, cand)

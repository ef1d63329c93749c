"""The baselines of the VAR runner, built from the text methods' configs (``method=h2o`` etc. on a VAR model).

Each text method's VAR counterpart reads the method's own parameters; what a VAR cache changes is said per class.
The observation queries of the window-scoring methods are the current scale's; their ``window`` most recent
tokens (the last ``window`` positions of VAR's flattened sequence, i.e. the end of the current scale) are kept
first, as the text methods' window, as long as the budget allows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvbench.errors import UsageError
from kvbench.var.allot import proportional
from kvbench.var.compress import ScaleContext, VarMethod


def recent_first(ctx: ScaleContext, scores: Tensor, window: int) -> Tensor:
    """Scores with the ``window`` most recent tokens above every other (the text methods' window, kept first)."""
    recent = ctx.positions >= ctx.current[1] - window
    scores = scores.double()
    return scores + recent * (scores.max() - scores.min() + 1.0)


class VarFull(VarMethod):
    """The full cache (fullkv): no compression, the reference every other method is compared with."""

    compresses: ClassVar[bool] = False

    def score(self, ctx: ScaleContext) -> Tensor:
        return torch.ones_like(ctx.positions, dtype=torch.float32)


class VarStreaming(VarMethod):
    """StreamingLLM-style: the first ``n_sink`` tokens (the condition token and the first scales' tokens) and the
    most recent ones, by position in VAR's flattened sequence."""

    def __init__(self, n_sink: int) -> None:
        self.n_sink = n_sink

    def score(self, ctx: ScaleContext) -> Tensor:
        pos = ctx.positions.double()
        return torch.where(ctx.positions < self.n_sink, pos + 1e9, pos)


class VarH2O(VarMethod):
    """H2O-style: each key's attention accumulated over every query that has attended to it, at every scale step
    (the scores persist across steps), plus the ``window`` most recent tokens."""

    def __init__(self, window: int) -> None:
        self.window = window

    def score(self, ctx: ScaleContext) -> Tensor:
        total = ctx.spans[f"scale_{len(ctx.patch_nums) - 1}"][1]
        acc = ctx.state.setdefault("h2o", torch.zeros(ctx.keys.shape[0], total + 1, device=ctx.keys.device))
        idx = torch.where(ctx.valid, ctx.positions, total)  # padding -> a spare column
        acc.scatter_add_(1, idx, ctx.mass() * ctx.valid)
        return recent_first(ctx, acc.gather(1, idx), self.window)


class VarSnapKV(VarMethod):
    """SnapKV-style window scoring: the current scale's attention, ``mean`` or ``sum`` over its queries, the
    ``window`` most recent tokens kept first. Deviation: no 1-D pooling (``kernel``/``pooling``): neighbours in
    VAR's flattened multi-scale raster are not neighbours in the image."""

    def __init__(self, window: int, reduce: str) -> None:
        self.window, self.reduce = window, reduce

    def score(self, ctx: ScaleContext) -> Tensor:
        mass = ctx.mass()
        return recent_first(ctx, mass if self.reduce == "sum" else mass / ctx.queries.shape[1], self.window)


class VarCAKE(VarMethod):
    """CAKE-like layer allocation: block preference P = H^(1/tau1) V^(1/tau2) of the current scale's attention
    (entropy H = -sum A log(A + 1e-10), V = sum over keys of the variance over queries), block budgets proportional
    to P (summing to blocks x keep per row), and within a block every row keeps its top ``mean + gamma var`` keys,
    the ``window`` most recent first. Deviation: no pooling, no decode eviction (VAR has no token-by-token decoding)."""

    def __init__(self, window: int, gamma: float, taus: Callable[[int], tuple[float, float]]) -> None:
        self.window, self.gamma, self.taus = window, gamma, taus

    def score(self, ctx: ScaleContext) -> Tensor:
        a = ctx.attention()  # (R, q, n)
        var = a.var(1) if a.shape[1] > 1 else torch.zeros_like(a[:, 0])
        return recent_first(ctx, a.mean(1) + self.gamma * var, self.window)

    def preference(self, ctx: ScaleContext, keep: int) -> float:
        a = ctx.attention()
        entropy = float(-(a * torch.log(a + 1e-10)).sum())
        var = float(a.var(1).sum()) if a.shape[1] > 1 else 0.0
        tau1, tau2 = self.taus(keep)
        return entropy ** (1 / tau1) * var ** (1 / tau2)

    def counts(self, ctxs: list[ScaleContext], keep: int) -> list[Tensor]:
        prefs = torch.tensor([self.preference(c, keep) for c in ctxs])
        if not bool((prefs > 0).any()):
            prefs = torch.ones_like(prefs)
        caps = torch.stack([c.lens.min() for c in ctxs])
        per_block = proportional(prefs, caps, len(ctxs) * keep)
        return [torch.full_like(c.lens, int(b)) for c, b in zip(ctxs, per_block, strict=True)]


def _hack(method: Any, n_blocks: int, n_heads: int) -> VarMethod:
    from kvbench.var.hack import HackScorer

    return HackScorer.from_params(method, n_blocks, n_heads)


ADAPTERS: dict[str, Callable[[Any, int, int], VarMethod]] = {
    "methods.fullkv.FullKV": lambda m, b, h: VarFull(),
    "methods.streamingllm.StreamingLLM": lambda m, b, h: VarStreaming(m.n_sink),
    "methods.h2o.H2O": lambda m, b, h: VarH2O(m.window),
    "methods.snapkv.SnapKV": lambda m, b, h: VarSnapKV(m.window, m.reduce),
    "methods.cake.CAKE": lambda m, b, h: VarCAKE(m.window, m.gamma, m.taus),
    "methods.hack.HACK": _hack,
}


def var_method(method: Any, n_blocks: int, n_heads: int) -> VarMethod:
    """The VAR counterpart of a ``conf/method`` object (exact class, not subclasses: PyramidKV is not SnapKV)."""
    key = f"{type(method).__module__}.{type(method).__qualname__}"
    if key not in ADAPTERS:
        names = ", ".join(k.split(".")[1] for k in ADAPTERS)
        raise UsageError(f"method {method.name!r} has no VAR version; VAR models run: {names}")
    return ADAPTERS[key](method, n_blocks, n_heads)


__all__ = ["ADAPTERS", "VarCAKE", "VarFull", "VarH2O", "VarSnapKV", "VarStreaming", "var_method"]

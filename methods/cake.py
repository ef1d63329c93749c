"""CAKE: cascading and adaptive KV-cache eviction with layer preferences."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from kvbench.budget import CrossLayerAllocator, LayerScores
from kvbench.engine.context import LayerContext
from kvbench.errors import UsageError
from kvbench.method import Method
from kvbench.ops import Workspace, pool1d, variance

# (tau1, tau2) per model and cache size C, from the authors' config/model2tau.json (antgroup/cakekv e6adc5e).
# The hub-id pattern picks the table's model key; any other model or C falls back to (1.0, 1.0), as in pred_cake.py.
TAU_TABLE: dict[str, dict[int, tuple[float, float]]] = {
    "llama3.1-8b-128k": {128: (1.6, 0.6), 1024: (1.6, 0.4)},
    "mistral-0.3-7b-32k": {128: (1.0, 0.8), 1024: (0.8, 0.5)},
    "qwen2.5-7b-instruct": {128: (0.4, 0.6), 1024: (1.5, 0.6)},
    "llama2-7b-chat-4k": {128: (0.9, 2.3), 1024: (1.9, 1.8)},
    "llama2-13b-chat-4k": {128: (1.8, 2.0), 1024: (0.5, 0.4)},
}
TAU_MODELS = {
    r"llama-3\.1-8b": "llama3.1-8b-128k",
    r"mistral-7b-instruct-v0\.3": "mistral-0.3-7b-32k",
    r"qwen2\.5-7b-instruct": "qwen2.5-7b-instruct",
    r"llama-2-7b-chat": "llama2-7b-chat-4k",
    r"llama-2-13b-chat": "llama2-13b-chat-4k",
}


def tau_for(model: str, cache_size: int) -> tuple[float, float]:
    """The authors' (tau1, tau2) for a hub id / model name and cache size C; (1.0, 1.0) when not tabulated."""
    for pattern, key in TAU_MODELS.items():
        if re.search(pattern, model, flags=re.IGNORECASE):
            return TAU_TABLE[key].get(cache_size, (1.0, 1.0))
    return (1.0, 1.0)


@dataclass
class CAKE(Method):
    """CAKE (https://arxiv.org/abs/2503.12491, antgroup/cakekv ``cake/model/modify_*.py``), methods_core §3.

    Per layer, with A the window attention (w = 32; all query heads; probabilities over all n keys; the window
    columns dropped):
      * preference P_l = H_l^(1/tau1) * V_l^(1/tau2), with the spatial entropy H_l = -sum A log(A + 1e-10) and the
        temporal variance V_l = sum_{q,j} Var_i A[q, i, j] (unbiased); stored in ``ctx.stats`` for the ``cake``
        allocator, which splits L * (C - w) non-window tokens over the layers (authors' integer adjustment);
      * indicator I = mean_i A + gamma * Var_i A (gamma = 200), average-pooled (k = 5, zero padding), then the mean
        over each KV head's G query heads.
    ``cascading`` (default on, the paper's setting): after every layer the budgets of all layers so far are
    recomputed from their preferences and each earlier layer is re-trimmed within its previous selection, so the
    prefill never holds much more than the final budget plus one full layer. Off: all layers stay full until the
    last one, then are evicted once (the same final cache up to integer effects, full-size peak).
    ``decode_evict`` (default on): at every generated token each layer appends it, attends over b_l + w + 1 tokens,
    then drops the lowest of its b_l + 1 non-window tokens by that query's pooled attention (no variance term),
    so every layer stays at its budget. Off = the form kvpress/DefensiveKV use as their CAKE baseline.
    tau1/tau2: ``auto`` looks up the authors' table by ``model`` (a hub id or name) and C = the per-head token budget
    (only C = 128 and 1024 are tabulated; anything else is (1, 1), as in pred_cake.py).

    Deviations: the budget unit is kvbench's (C = ``ctx.keep`` tokens per KV head, window included; fractional
    budgets give C = floor(b * n)); compression is skipped when n <= C + w, as in the authors' code; scores stay in
    the model dtype (fp32 on CPU; the authors cast to fp16/bf16).
    """

    name: str = "cake"
    window: int = 32
    gamma: float = 200.0
    kernel: int = 5
    tau1: float | str = "auto"
    tau2: float | str = "auto"
    model: str = ""
    cascading: bool = True
    decode_evict: bool = True
    _work: Workspace = field(default_factory=Workspace, repr=False, compare=False)

    shares_prefill: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        pool1d(torch.zeros(1, 8), self.kernel, "avg")
        for name in ("tau1", "tau2"):
            value = getattr(self, name)
            if value != "auto" and (isinstance(value, str) or not value > 0):
                raise UsageError(f"{name} must be 'auto' or a positive number, got {value!r}")

    def taus(self, cache_size: int) -> tuple[float, float]:
        auto = tau_for(self.model, cache_size)
        return (auto[0] if self.tau1 == "auto" else float(self.tau1),
                auto[1] if self.tau2 == "auto" else float(self.tau2))

    def score(self, ctx: LayerContext) -> Tensor:
        attn = ctx.window_attention()  # (H_q, w, n - w)
        var = variance(attn, 1, self._work)  # (H_q, n - w), unbiased over the window queries
        a32 = attn.float()
        shifted = torch.add(a32, 1e-10, out=self._work.get("entropy", tuple(a32.shape), a32.device))  # reused
        entropy = -shifted.log_().mul_(a32).sum()  # -sum A log(A + 1e-10)
        tau1, tau2 = self.taus(ctx.keep)
        ctx.stats["seq_len"] = ctx.n  # the prompt's length: cascading re-plans clamp against it, not the trimmed one
        ctx.stats["preference"] = float(entropy ** (1 / tau1) * var.float().sum() ** (1 / tau2))
        indicator = attn.mean(1) + self.gamma * var  # (H_q, n - w)
        return ctx.group(pool1d(indicator, self.kernel, "avg", self._work), "mean")  # (H_kv, n - w)

    def decode_score(self, ctx: LayerContext) -> Tensor:
        w, n = ctx.window, ctx.n
        q = ctx.queries.reshape(ctx.n_kv_heads, ctx.n_groups, -1)  # (H_kv, G, d): the new token's queries
        logits = torch.einsum("hgd,hnd->hgn", q.float(), ctx.keys.float()) * ctx.scaling  # (H_kv, G, n)
        probs = logits.softmax(-1).to(ctx.queries.dtype)[..., : n - w]  # (H_kv, G, n - w)
        return pool1d(probs, self.kernel, "avg").mean(1)  # (H_kv, n - w)


def adjust_budgets(budgets: list[float], total: int, seq_len: int) -> list[int]:
    """The authors' ``adjust_budgets`` (cake/utils.py), on integers.

    1. floor; 2. clamp at seq_len and spread the excess evenly over the layers still below it (remainder +1 to the
    first of them); 3. spread total - sum evenly over the layers < seq_len (adding) or > 1 (removing), remainder to
    the lowest indices. As in the original, steps 2-3 can push a layer past seq_len again: the engine then keeps
    what the layer has.
    """
    b = np.array(budgets, dtype=float).astype(int)
    excess = int(np.maximum(b - seq_len, 0).sum())
    b = np.minimum(b, seq_len)
    if excess > 0:
        _spread(b, b < seq_len, excess)
    diff = total - int(b.sum())
    if diff > 0:
        _spread(b, b < seq_len, diff)
    elif diff < 0:
        _spread(b, b > 1, diff)
    return b.tolist()


def _spread(b: np.ndarray, eligible: np.ndarray, amount: int) -> None:
    """Add ``amount`` (or remove, if negative) evenly over the eligible entries; the remainder goes one each to the
    first eligible entries."""
    idx = np.where(eligible)[0]
    if len(idx) == 0:
        return
    sign, amount = (1, amount) if amount > 0 else (-1, -amount)
    b[idx] += sign * (amount // len(idx))
    b[idx[: amount % len(idx)]] += sign


@dataclass
class CakeAllocator(CrossLayerAllocator):
    """CAKE's layer budgets (methods_core §3.2): beta_l = P_l / sum_k P_k * T over the layers scored so far, with
    T = L * (C - w), then ``adjust_budgets`` against the n - w candidates; every KV head of a layer keeps beta_l.

    Compression is skipped (nothing planned) when n <= C + w, as in the authors' ``CakeprefillKVCache``.
    """

    name: str = "cake"

    def plan(self, layers: dict[int, LayerScores], keep: int, n_layers: int) -> dict[int, Tensor]:
        order = sorted(layers)
        first = layers[order[0]]
        window = first.n - first.scores.shape[1]
        if any("preference" not in layers[i].stats for i in order):
            raise UsageError("the cake allocator needs a method that reports layer preferences (method=cake)")
        seq_len = max(layers[i].stats.get("seq_len", layers[i].n) for i in order)
        if seq_len <= keep + window:
            return {}
        total = n_layers * (keep - window)
        prefs = np.array([layers[i].stats["preference"] for i in order], dtype=float)
        raw = prefs / prefs.sum() * total if prefs.sum() > 0 else np.full(len(order), total / len(order))
        budgets = adjust_budgets(raw.tolist(), total, seq_len - window)
        return {i: torch.full((layers[i].scores.shape[0],), min(b, seq_len - window), dtype=torch.long)
                for i, b in zip(order, budgets, strict=True)}

"""DefensiveKV: worst-case (defensive) aggregation of window attention, value-norm weighting, flattened top-k."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvbench.engine.context import LayerContext
from kvbench.method import Method
from kvbench.ops import Workspace, pool1d

PRODUCTS_PER_CHUNK = 2**18  # value-norm products per chunk (fp32: 1 MiB)


@dataclass
class DefensiveKV(Method):
    """DefensiveKV (https://github.com/FFY0/DefensiveKV, ``efficient_defensivekv_press.py``), methods_core §5.1-5.2.

    Per layer, with A the window attention (w = 32, probabilities over all n keys, non-window columns kept):
      1. ave[h, j] = mean_{g,i} A; base[h, g, i] = sum_j A (row mass).
      2. P = avgpool_5(A) per row, renormalised to keep the row mass: P <- P / sum_j P * base.
      3. Defensive aggregation: M[h, j] = max_g max_i P; D = max(M, mean_j M) (worst case, floored at the mean).
      4. CriticalKV value norms: N[h, j] = mean_g ||v_{h,j} W_O^{(h,g)}||_1, normalised across KV heads per token;
         S = D * N / sum_h N.
      5. Stage-1 forcing: window_bias = mean mass on the w keys just before the window; tau = 0.9 - window_bias;
         c_h = first index where the cumulative sorted ave[h]/sum(ave[h]) reaches tau (argmax of the boolean, so
         one token short of tau, as in the authors' code), clamped to int((n - w) * keep / n - w); those top c_h
         tokens of head h get S = max(S).
    The window is always kept. The ``head_adaptive`` allocator with alpha = 0 (``conf/method/defensivekv.yaml``)
    then takes the layer's flattened top-k over all (head, token) scores: heads get unequal lengths, physically.

    Deviations: the layer budget is H_kv * floor(n * budget) entries instead of floor(n * budget * H_kv) (at most
    H_kv - 1 entries apart); scores stay in the model dtype (fp32 on CPU; the authors cast to bf16).
    """

    name: str = "defensivekv"
    window: int = 32
    kernel: int = 5
    tau: float = 0.9
    norm_chunk: int = 256
    _work: Workspace = field(default_factory=Workspace, repr=False, compare=False)

    def score(self, ctx: LayerContext) -> Tensor:
        key = f"defensivekv:{ctx.window}:{self.kernel}"  # what does not depend on the budget, once per layer
        if key not in ctx.memo:  # (a budget sweep shares the layer's memo across budgets)
            ctx.memo[key] = self.budget_free_scores(ctx)
        s, ave, attn = ctx.memo[key]
        return self.force_stage1(s, ave, attn, ctx)

    def budget_free_scores(self, ctx: LayerContext) -> tuple[Tensor, Tensor, Tensor]:
        """Steps 1-4: the scores S (H, n - w) before stage-1 forcing, ave (H, n - w) and the window attention."""
        h, w, n = ctx.n_kv_heads, ctx.window, ctx.n
        attn = ctx.window_attention().float()  # (H_q, w, n - w)
        grouped = attn.reshape(h, ctx.n_groups, w, n - w)  # (H, G, w, n - w)
        ave = grouped.mean((1, 2))  # (H, n - w)
        # (H, G, w, n - w), a fresh tensor (renormalised in place below)
        pooled = pool1d(grouped, self.kernel, "avg", self._work) if self.kernel > 1 else grouped.clone()
        pooled.div_(pooled.sum(-1, keepdim=True).clamp_min(1e-30)).mul_(grouped.sum(-1, keepdim=True))  # in place
        m = pooled.amax((1, 2))  # (H, n - w)
        d = torch.maximum(m, m.mean(-1, keepdim=True))
        norms = self.value_norms(ctx, n - w)  # (H, n - w)
        return d * norms / norms.sum(0, keepdim=True).clamp_min(1e-30), ave, attn

    def value_norms(self, ctx: LayerContext, tokens: int | None = None) -> Tensor:
        """N[h, j] = mean_g ||v_{h,j} W_O^{(h,g)}||_1 for the first ``tokens`` (default all n): (H_kv, tokens).

        One batched matmul per chunk of tokens against the G stacked W_O slices of each KV head, into one
        (H, chunk, G * hidden) workspace buffer reused by every chunk and layer (``kvbench.ops.Workspace``), the
        absolute value taken in place. A chunk has ``norm_chunk`` tokens at most and fewer when its products would
        pass ``PRODUCTS_PER_CHUNK`` floats (1 MiB: the buffer stays in a core's L2 cache for the abs and sum that
        follow; SmolLM2-135M: 64 tokens, 14 % faster than 256). Each product row is one token's matmul row and the
        reductions run over the same axes, so the norms do not depend on the chunk, bit for bit
        (tests/test_fast_scoring.py).
        """
        h, g, d = ctx.n_kv_heads, ctx.n_groups, ctx.values.shape[-1]
        tokens = ctx.n if tokens is None else tokens
        weight = ctx.module.o_proj.weight.detach()  # (hidden, H_q * d); out= buffers need no autograd
        w_o = weight.T.float().reshape(h, g, d, -1).transpose(1, 2).reshape(h, d, -1)  # (H, d, G * hidden)
        chunk = min(self.norm_chunk, ctx.n, max(16, PRODUCTS_PER_CHUNK // (h * w_o.shape[-1])))
        out = torch.empty(h, tokens, device=ctx.values.device)
        buf = self._work.get("products", (h * chunk * w_o.shape[-1],), ctx.values.device)
        for s in range(0, tokens, chunk):
            v = ctx.values[:, s : s + chunk].float()  # (H, c, d)
            c = v.shape[1]
            prod = torch.bmm(v, w_o, out=buf[: h * c * w_o.shape[-1]].view(h, c, -1)).abs_()  # (H, c, G * hidden)
            norms = prod.view(h, c, g, -1).sum(-1).transpose(1, 2).contiguous().mean(1)  # (H, c), G mean as before
            out[:, s : s + c] = norms[:, : tokens - s]
        return out

    def force_stage1(self, s: Tensor, ave: Tensor, attn: Tensor, ctx: LayerContext) -> Tensor:
        """CriticalKV stage 1: give each head's top-c_h tokens (by ave) the tensor-wide maximum score."""
        w, n = ctx.window, ctx.n
        bias = attn[:, :, max(0, n - 2 * w) : n - w].sum(-1).mean()  # mass on the w keys before the window
        sorted_ave, order = (ave / ave.sum(-1, keepdim=True).clamp_min(1e-30)).sort(-1, descending=True)
        counts = (sorted_ave.cumsum(-1) >= self.tau - bias).int().argmax(-1)  # (H,)
        limit = max(0, int((n - w) * ctx.keep / n - w))
        counts = counts.clamp(max=limit)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order))
        return torch.where(rank < counts[:, None], s.max(), s)  # (H, n - w): a token's rank by ave in its head

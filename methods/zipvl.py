"""ZipVL (``method=zipvl``, the paper's v1: mixed-precision KV; ``method=zipvl_evict``, v2: eviction): the scoring
kernels as pure tensor functions and the :class:`ZipVL` method.

ZipVL (He et al., 2024, https://arxiv.org/abs/2410.08584; no public code: Algorithm 1 and the tables as
transcribed in deep-diver/ai-paper-reviewer ``content/paper-reviews/2410.08584``, the probe choice and the
normalisation from the authors' earlier ZipCache, https://arxiv.org/abs/2405.14256), per layer at prefill:

1. **Probe queries** (:func:`probe_positions`): the last ``recent`` tokens plus ``random`` uniformly drawn earlier
   tokens (ZipCache's recent + random probes; 64 + 64 here, reconstructed: the paper's counts were not retrieved).
2. **Probe attention with causal normalisation** (:func:`probe_scores`): ``A' = softmax(Q' K^T / sqrt(d))`` with
   each probe attending only to positions <= its own; token j's score is the column sum of ``A'`` divided by the
   number of probes that can see j (ZipCache's normalisation: removes the bias toward early tokens, which more
   probes see). GQA: a KV head's score is the mean over its query heads; the layer's score the mean over heads.
3. **Adaptive ratio** (:func:`adaptive_count`): the number of important tokens ``p`` is the smallest count whose
   top-p score mass reaches ``tau`` of the total (``tau = 0.975`` or ``0.96``), so uniform scores keep a ``tau``
   fraction and a peaked distribution keeps few; per layer.
4. The top-p tokens are the important set (:func:`important_mask`): sparse prefill attention over them and, in
   v1, high-bit KV for them and low-bit for the rest; v2 (``zipvl_evict``) drops the rest.
5. Decoding attends over the stored cache; every 100 new tokens their scores are recomputed (probes among those
   tokens' own queries, against the whole cache) and they are re-compressed by the same rule.

How kvbench runs it (:class:`ZipVL`): the important set is one set of tokens per layer (token-level sparsity: the
layer score is the mean over KV heads), chosen before the layer's attention: the engine calls ``plan`` first and
times it as compression (the scoring is the method's cost even though its sparse attention uses it too). The
prefill attention is computed on the gathered ``Q[T], K[T], V[T]`` only (causal among them), so its QK^T / AV FLOPs
really are ``p^2 / n^2`` of the dense ones; the layer's ``prefill_attention_flops_saved`` stat is
``1 - p^2 / n^2`` and ``probe_flops_fraction`` the probes' own cost (``2 * probes * n / n^2``), both in
``Engine.layer_stats`` (each prediction's ``layer_stats``, averaged into metrics.json's ``method_stats``). The
attention output of the
unimportant tokens is 0 (reconstructed: the retrieved text does not say; the residual stream carries them through
the layer). The KV cache goes to the quantised store as a per-token plan (``kvbench.engine.quant``): important
tokens ``HIGH`` at ``bits_high``, the rest ``LOW`` at ``bits_low`` (ZipCache's 4 / 2 bits, reconstructed), keys per
channel over token groups and values per token, real packed bytes; v2 evicts the rest and keeps the important ones
in full precision. Text tokens are scored like image tokens (ZipVL's rule is modality-agnostic); the image spans are
not needed.

Known consequence of the zero-output reconstruction (measured on the text default, kvbench-tiny, 4 samples of
synth_multikey_dense): the last prompt token is not important in layers 1 and 2 there, so its attention output is
0 and the answer is lost (``zipvl`` 25 %, ``zipvl_evict`` 0 % exact match, against 100 % / 75 % with
``sparse_prefill=false`` and 100 % for the full cache). Deviation, ours: ``keep_last=true`` (the default) always
makes the last token of the compressed forward important (at the budget cap it replaces the weakest important
token; on the same 4 samples ``zipvl`` 100 %, ``zipvl_evict`` 75 % at budget 1.0); ``keep_last=false`` is the
plain rule. Report ``sparse_prefill=false`` next to it until the paper's handling of the unimportant queries is
known.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from kvbench.engine.attention import causal_attention
from kvbench.engine.context import LayerContext
from kvbench.engine.packed import FULL
from kvbench.engine.quant import HIGH, LOW, QuantSpec, check_bits
from kvbench.errors import UsageError
from kvbench.method import Method
from kvbench.ops import Workspace

TAU = 0.975
RECENT, RANDOM = 64, 64


def probe_positions(n: int, recent: int = RECENT, random: int = RANDOM, generator: torch.Generator | None = None
                    ) -> Tensor:
    """Sorted probe indices: the last ``recent`` positions and ``random`` distinct earlier ones (all if fewer)."""
    tail = torch.arange(max(0, n - recent), n)
    head = max(0, n - recent)
    pick = torch.randperm(head, generator=generator)[: min(random, head)]
    return torch.cat([pick.sort().values, tail])


def probe_scores(queries: Tensor, keys: Tensor, probes: Tensor, scale: float | None = None) -> Tensor:
    """Causally normalised probe attention of every token: [H_kv, n].

    queries: [H_q, n, d] and keys: [H_kv, n, d] post-RoPE; probes: [p] query positions (sorted). Token j's score
    is ``sum_i A'[i, j] / #{i : probe_i >= j}``; tokens no probe can see score 0."""
    return probe_attention(queries[:, probes], keys, probes, scale)


def probe_attention(probe_queries: Tensor, keys: Tensor, probes: Tensor, scale: float | None = None,
                    work: Workspace | None = None) -> Tensor:
    """:func:`probe_scores` from the probes' own queries: probe_queries [H_q, p, d] at cache positions ``probes``
    [p] (sorted), keys [H_kv, n, d]. Returns [H_kv, n].

    The logits of each query head are one matmul against its KV head's keys (no repeated copy of the keys), into
    one [H_q, p, n] buffer (``work``'s ``probe`` buffer when given, reused by every layer), then scaled and masked
    in one pass, ``mask + scale * logits`` with a [p, n] mask of 0 and -inf, and softmaxed in place. For finite
    logits these are the values of the batched, out-of-place ``(logits * scale).masked_fill(...)`` bit for bit
    (0 + round(scale * x) is round(scale * x); at most a -0 becomes +0, which changes no probability), without
    four fresh multi-MiB tensors per layer and without ``masked_fill``'s slow broadcast loop
    (tests/test_vlm_kernels.py)."""
    h_q, p, d = probe_queries.shape
    h_kv, n = keys.shape[:2]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    q, k = probe_queries.float(), keys.float()
    cols = torch.arange(n, device=keys.device)
    hidden = probes[:, None] < cols[None, :]  # [p, n] probe i sees j <= probes[i]
    mask = torch.zeros(p, n, device=keys.device).masked_fill_(hidden, float("-inf"))  # [p, n] 0 or -inf
    logits = torch.empty(h_q, p, n, device=keys.device) if work is None else work.get("probe", (h_q, p, n), keys.device)
    for i in range(h_q):  # query head i belongs to KV head i // G
        torch.mm(q[i], k[i // (h_q // h_kv)].T, out=logits[i])  # [p, n]
        torch.add(mask, logits[i], alpha=scale, out=logits[i])  # scaled and masked, while the head is in cache
    attn = torch.softmax(logits, dim=-1, out=logits)  # [H_q, p, n], in place
    seen = (p - torch.searchsorted(probes, cols)).clamp(min=1)  # [n] probes at positions >= j (sorted probes)
    per_q = attn.sum(1) / seen  # [H_q, n]
    return per_q.view(h_kv, h_q // h_kv, n).mean(1)


def adaptive_count(scores: Tensor, tau: float = TAU) -> int:
    """The smallest p with (sum of the p largest scores) >= tau * (sum of all); scores: [n] non-negative.

    Compared in float64 with a 1e-9 relative slack, so that a mass equal to ``tau`` in exact arithmetic counts."""
    s = scores.double().flatten().sort(descending=True).values
    total = s.sum()
    if total <= 0:
        return s.numel()
    mass = s.cumsum(0)
    return int(torch.searchsorted(mass, tau * total * (1 - 1e-9)).item()) + 1


def adaptive_ratio(scores: Tensor, tau: float = TAU) -> float:
    """``adaptive_count / n``: the fraction of a layer's tokens ZipVL marks important."""
    return adaptive_count(scores, tau) / scores.numel()


def important_mask(scores: Tensor, count: int) -> Tensor:
    """Boolean mask of the ``count`` highest-scoring tokens: [n]."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[scores.flatten().topk(min(count, scores.numel())).indices] = True
    return mask


def attention_flops_saved(counts: list[int], n: int) -> float:
    """Fraction of prefill attention FLOPs (QK^T and AV, causal) saved by attending among each layer's ``counts[l]``
    important tokens only: ``1 - sum_l p_l^2 / (L n^2)`` (token-level sparse attention costs p^2 instead of n^2)."""
    return 1.0 - sum(p * p for p in counts) / (len(counts) * n * n)


@dataclass
class ZipVL(Method):
    """ZipVL v1 (https://arxiv.org/abs/2410.08584): adaptive important tokens per layer, sparse prefill attention over
    them, mixed-precision KV (see the module docstring for how kvbench runs it and what is reconstructed).

    Every token is kept (at ``bits_high`` or ``bits_low``). ``budget=1.0`` is the paper's rule (as many important
    tokens as tau says; the memory held is set by tau and the bit widths, ``kv_bytes_kept``); a smaller budget caps
    each layer's important tokens (high precision, and the sparse prefill's tokens) at the budget, the rest at
    ``bits_low`` (a kvbench choice, not in the paper, as in ``zipvl_evict``, for comparisons at equal budgets).
    ``zipvl_evict`` (v2) evicts the unimportant tokens instead.

    Parameters:
        tau: the attention-mass threshold of the adaptive ratio (0.975; the paper also runs 0.96).
        recent, random: probe queries (the last ``recent`` + ``random`` earlier ones; reconstructed from ZipCache).
        bits_high, bits_low: 2 | 4 | 8 | 16 (16 = full precision). group_size: tokens per key group (per channel),
        channels per value group (per token).
        sparse_prefill: attend among the important tokens only at prefill (False: dense prefill attention, only
        the KV compression; an ablation).
        keep_last: the last token of each compressed forward is always important (deviation, ours: with the
        zero-output reconstruction an unimportant last prompt token has attention output 0 and the first
        generated token is lost; False: the plain top-p rule).
        recompress_every: re-compress the newest tokens after this many (100, the paper; 0 = never).
        seed: of the random probes (one generator per layer: the same probes in every run and budget fork).
    """

    name: str = "zipvl"
    tau: float = 0.975
    recent: int = RECENT
    random: int = RANDOM
    bits_high: int = 4
    bits_low: int = 2
    group_size: int = 32
    sparse_prefill: bool = True
    keep_last: bool = True
    recompress_every: int = 100
    seed: int = 0
    _work: Workspace = field(default_factory=Workspace, repr=False, compare=False)

    compresses: ClassVar[bool] = False  # every token is kept, at one of two precisions
    shares_prefill: ClassVar[bool] = False  # the sparse prefill attention changes the prefill itself
    plans: ClassVar[bool] = True
    own_prefill_attention: ClassVar[bool] = True
    layer_store: ClassVar[str] = "quantized"
    keeps_window: ClassVar[bool] = False  # no always-kept window: the recent tokens compete like the others
    blockwise: ClassVar[bool] = False  # the sparse prefill attends among the important tokens of the whole prompt
    unimportant: ClassVar[int] = LOW  # the plan code of the tokens outside the important set

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.tau <= 1:
            raise UsageError(f"tau={self.tau} must be in (0, 1]")
        if self.recent < 1 or self.random < 0 or self.recompress_every < 0:
            raise UsageError(f"recent={self.recent} must be >= 1, random={self.random} and "
                             f"recompress_every={self.recompress_every} >= 0")
        check_bits(self.bits_high, "bits_high", allow_full=True)
        check_bits(self.bits_low, "bits_low", allow_full=True)
        self.quant_spec()

    def quant_spec(self) -> QuantSpec:
        """Nothing is flushed (``residual=None``): every token waits in full precision for its plan."""
        packed = self.bits_low if self.bits_low != FULL else 8  # the spec's bits are unused without a residual
        return QuantSpec(packed, packed, self.group_size, None)

    def plan_bits(self) -> tuple[int, int]:
        return self.bits_high, self.bits_low

    def replan_interval(self) -> int:
        return self.recompress_every

    def score(self, ctx: LayerContext) -> Tensor:
        """Never called (``plans``): the layer score is :meth:`important`'s."""
        raise NotImplementedError("ZipVL plans its tokens (plan())")

    def important(self, ctx: LayerContext) -> Tensor:
        """(m,) bool: the important set among the layer's last m tokens (m = ``ctx.queries.shape[1]``), from probes
        among those tokens' queries against all n cached keys; the layer's stats go to ``ctx.stats``."""
        m, n = ctx.queries.shape[1], ctx.n
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + ctx.layer_idx)
        local = probe_positions(m, self.recent, self.random, gen).to(ctx.keys.device)  # (p,) within the m
        scores = probe_attention(ctx.queries[:, local], ctx.keys, local + (n - m), ctx.scaling, self._work)  # (H_kv, n)
        layer_scores = scores[:, n - m:].mean(0)  # (m,) token-level: one set for all heads
        count = min(adaptive_count(layer_scores, self.tau), ctx.keep)
        mask = important_mask(layer_scores, count)
        if self.keep_last and not bool(mask[-1]):  # deviation: the last token's output makes the next token
            if count >= ctx.keep and count > 0:  # at the budget cap: the weakest important token makes room
                mask[layer_scores.masked_fill(~mask, float("inf")).argmin()] = False
            mask[-1] = True
        count = int(mask.sum())
        saved = attention_flops_saved([count], m) if self.sparse_prefill else 0.0
        ctx.stats.update(important_tokens=count, important_ratio=count / m, prefill_attention_flops_saved=saved,
                         probe_flops_fraction=2 * len(local) * n / (m * m))
        return mask

    def important_once(self, ctx: LayerContext) -> Tensor:
        """:meth:`important`, computed once per layer context (``ctx.memo``): the plan and the sparse prefill
        attention use the same set."""
        if "zipvl_important" not in ctx.memo:
            ctx.memo["zipvl_important"] = self.important(ctx)
        return ctx.memo["zipvl_important"]

    def prefill_attention(self, ctx: LayerContext, backend: str) -> Tensor:
        """Causal attention among the important tokens only; 0 at the others. -> (n, H_q, d). The important set is
        the one the engine's ``plan(ctx)`` call just computed (in ``ctx.memo``), else computed here."""
        keep = self.important_once(ctx)
        q, k, v = ctx.queries[None], ctx.keys[None], ctx.values[None]  # (1, H, n, d)
        if not self.sparse_prefill:
            return causal_attention(q, k, v, ctx.scaling, backend)[0]
        idx = keep.nonzero().squeeze(1)  # (p,) in token order: causal among them = causal by position
        out = q.new_zeros(q.shape[2], q.shape[1], q.shape[3])  # (n, H_q, d)
        out[idx] = causal_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx], ctx.scaling, backend)[0]
        return out

    def plan(self, ctx: LayerContext) -> Tensor:
        """(H, m) codes: ``HIGH`` for the important tokens, ``unimportant`` (LOW; v2: EVICT) for the others."""
        keep = self.important_once(ctx)
        codes = torch.full(keep.shape, self.unimportant, dtype=torch.int8, device=keep.device)
        codes[keep] = HIGH
        return codes.expand(ctx.n_kv_heads, -1)

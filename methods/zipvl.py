"""ZipVL's scoring kernels as pure tensor functions (the ``Method`` and the mixed-precision store come later).

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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

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
    h_q, n, d = queries.shape
    h_kv = keys.shape[0]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    k = keys.float().repeat_interleave(h_q // h_kv, dim=0)  # [H_q, n, d]
    logits = queries[:, probes].float() @ k.transpose(1, 2) * scale  # [H_q, p, n]
    visible = probes[:, None] >= torch.arange(n)[None, :]  # [p, n] causal: probe i sees j <= probes[i]
    attn = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)  # [H_q, p, n]
    seen = visible.sum(0).clamp(min=1)  # [n] probes that can attend to j
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
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[scores.flatten().topk(min(count, scores.numel())).indices] = True
    return mask


def attention_flops_saved(counts: list[int], n: int) -> float:
    """Fraction of prefill attention FLOPs (QK^T and AV, causal) saved by attending among each layer's ``counts[l]``
    important tokens only: ``1 - sum_l p_l^2 / (L n^2)`` (token-level sparse attention costs p^2 instead of n^2)."""
    return 1.0 - sum(p * p for p in counts) / (len(counts) * n * n)

"""GUI-KV (``method=guikv``): SnapKV window scores + spatial saliency on the current screenshot + temporal
redundancy of the earlier screenshots, as pure tensor kernels and the :class:`GUIKV` method.

GUI-KV (Huang et al., 2025, https://arxiv.org/abs/2510.00536; code SalesforceAIResearch/GUI-KV @ b301d41,
``gui_kv/gui_kv_utils.py::GUIKVCluster.update_kv``), per layer at prefill, on top of SnapKV's pooled window scores
``S [H, n - W]`` (window W = min(8, cap - 2), average pooling 5; the engine's window attention):

1. **Spatial saliency** (:func:`spatial_saliency`): on the current (last) screenshot's span, the L2 norm of the
   layer's attention-input hidden states (after the input RMSNorm), standardised (mean, *unbiased* std + 1e-8),
   ``alpha * softmax(z / temperature)`` with ``alpha = 2``, ``temperature = 3.5``, added to every head's scores.
2. **Temporal redundancy** (:func:`qr_basis`, :func:`residual_norms`, :func:`zero_redundant`): per head, a basis
   of the current screenshot's post-RoPE keys ``K_T [m, d]`` from the reduced QR of ``K_T^T``, its first
   ``rank = min(32, m, d)`` columns. With ``m > d`` those columns span the keys of the current screenshot's
   **first ``rank`` tokens** (raster order), not its principal subspace: the authors' quirk, kept. Every earlier
   screenshot token gets the residual ``|| k - B B^T k ||``; the ``int((1 - cap / n) * n_prev)`` smallest
   (the most redundant) get score 0. :func:`svd_basis` (the top right-singular vectors of ``K_T``) is offered as a
   flagged deviation (``basis="svd"``).
3. Top ``cap - W`` by score per head + the window; KV heads are repeated to the query heads first
   (per-query-head cache, G x the bytes), as the authors do.

Text and other non-image tokens (the authors' ``GUIKVCluster``): they are scored by the window attention alone and
compete with the image tokens for the same top-k; saliency touches only the current screenshot and redundancy only
the earlier ones. A prompt without image spans is therefore scored as SnapKV with the authors' settings (sum over
the window, average pooling 5); the authors' code needs at least one image (it indexes ``vision_start_idx[-1]``).

Deviations (documented choices): a current-screenshot span that reaches into the window is clipped to the scored
prefix, and earlier-screenshot tokens inside the window are not candidates for zeroing (the authors' slice
assignment would fail on them). The window is ``min(8, budget)`` (the engine's clamp); the authors use
``min(8, cap - 2)``, which differs only for budgets under 10 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvbench.engine.context import LayerContext
from kvbench.errors import UsageError
from kvbench.method import Method
from kvbench.ops import group_reduce, pool1d

ALPHA = 2.0  # the authors' scripts: --alpha 2
TEMPERATURE = 3.5  # --temperature 3.5
RANK = 32  # QR rank (the log-dir name: "...-key-qr-unweighted-r32-...")
WINDOW = 8  # --window_size 8


def spatial_saliency(hidden: Tensor, alpha: float = ALPHA, temperature: float = TEMPERATURE) -> Tensor:
    """``alpha * softmax(zscore(||x_j||) / temperature)`` over the current screenshot's tokens.

    hidden: [m, D] attention-input hidden states of the span. Returns [m] (sums to ``alpha``)."""
    norms = hidden.float().norm(p=2, dim=-1)  # [m]
    z = (norms - norms.mean()) / (norms.std() + 1e-8)  # torch.std: unbiased, as the authors
    return alpha * torch.softmax(z / temperature, dim=0)


def qr_basis(keys: Tensor, rank: int = RANK) -> Tensor:
    """The authors' basis: ``Q[:, :r]`` of the reduced QR of ``keys^T``, r = min(rank, m, d).

    keys: [m, d] one head's keys of the current screenshot. Returns [d, r] orthonormal columns spanning the keys of
    its first r tokens (when they are independent)."""
    q, _ = torch.linalg.qr(keys.float().T, mode="reduced")  # [d, min(d, m)]
    return q[:, : min(rank, keys.shape[0], keys.shape[1])]


def svd_basis(keys: Tensor, rank: int = RANK) -> Tensor:
    """Deviation (``basis="svd"``): the top-r right singular vectors of ``keys`` (its principal key subspace).

    keys: [m, d]. Returns [d, r]."""
    _, _, vh = torch.linalg.svd(keys.float(), full_matrices=False)  # vh: [min(m, d), d]
    return vh[: min(rank, keys.shape[0], keys.shape[1])].T


def residual_norms(prev_keys: Tensor, basis: Tensor) -> Tensor:
    """``|| k - B B^T k ||`` of every earlier-screenshot key: 0 = fully explained by the current screenshot.

    prev_keys: [p, d]; basis: [d, r] orthonormal. Returns [p]."""
    k = prev_keys.float()
    return (k - (k @ basis) @ basis.T).norm(p=2, dim=-1)


def n_redundant(budget_fraction: float, n_prev: int) -> int:
    """How many earlier-screenshot tokens lose their score: ``int((1 - cap / n) * n_prev)``."""
    return max(0, int((1.0 - budget_fraction) * n_prev))


def zero_redundant(scores: Tensor, positions: Tensor, residuals: Tensor, count: int) -> Tensor:
    """Scores with the ``count`` smallest-residual positions set to 0 (a copy).

    scores: [n'] one head's token scores; positions: [p] their indices; residuals: [p]."""
    out = scores.clone()
    if count > 0:
        out[positions[residuals.topk(count, largest=False).indices]] = 0
    return out


def span_positions(spans: list[tuple[int, int]]) -> Tensor:
    """All token indices of the given ``[start, end)`` spans, in order.  # [sum of lengths]"""
    return torch.cat([torch.arange(s, e) for s, e in spans]) if spans else torch.empty(0, dtype=torch.long)


def guikv_scores(scores: Tensor, hidden: Tensor, keys: Tensor, images: list[tuple[int, int]], budget_fraction: float,
                 alpha: float = ALPHA, temperature: float = TEMPERATURE, rank: int = RANK, basis: str = "qr"
                 ) -> Tensor:
    """One layer's GUI-KV scores: pooled window scores + spatial saliency on the last image, redundant earlier
    image tokens zeroed per head.

    scores: [H, n'] pooled window attention of the non-window tokens (n' = n - W); hidden: [n, D] attention-input
    hidden states; keys: [H, n, d] post-RoPE keys (H as scored: query heads in the authors' layout); images:
    ``[start, end)`` of every screenshot, in order (the last is the current one); ``budget_fraction`` = cap / n.
    Returns [H, n']."""
    out = scores.float().clone()
    start, end = images[-1]
    stop = max(start, min(end, out.shape[-1]))  # a span reaching into the window is clipped (module docstring)
    out[:, start:stop] += spatial_saliency(hidden[start:end], alpha, temperature)[: stop - start]
    prev = span_positions(images[:-1]).to(out.device)
    prev = prev[prev < out.shape[-1]]  # earlier-screenshot tokens in the window are kept anyway
    if prev.numel() == 0:
        return out
    make_basis = {"qr": qr_basis, "svd": svd_basis}[basis]
    count = n_redundant(budget_fraction, prev.numel())
    for h in range(out.shape[0]):
        res = residual_norms(keys[h, prev], make_basis(keys[h, start:end], rank))
        out[h] = zero_redundant(out[h], prev, res, count)
    return out


def group_scores(scores: Tensor, n_kv_heads: int, reduce: str = "max") -> Tensor:
    """Deviation (the GQA-aware variant): query-head scores reduced over each KV head's group, so one token set per
    KV head is kept (1/G of the authors' per-query-head cache bytes).

    scores: [H_q, n] with query heads grouped as ``repeat_kv`` lays them out (KV head h serves query heads
    h*G .. h*G+G-1). Returns [H_kv, n]."""
    h_q, n = scores.shape
    grouped = scores.view(n_kv_heads, h_q // n_kv_heads, n)
    if reduce == "max":
        return grouped.max(dim=1).values
    if reduce == "mean":
        return grouped.mean(dim=1)
    raise ValueError(f"reduce={reduce!r}; choose max or mean")


def visual_spans(spans: dict[str, tuple[int, int]]) -> list[tuple[int, int]]:
    """Every ``image:<k>`` / ``frame:<k>`` span, in token order (the last is the current screenshot)."""
    return sorted(v for k, v in spans.items() if k.startswith(("image:", "frame:")))


@dataclass
class GUIKV(Method):
    """GUI-KV (https://arxiv.org/abs/2510.00536; SalesforceAIResearch/GUI-KV @ b301d41), see the module docstring.

    Per layer at prefill: the window attention summed over the last ``window`` queries, average-pooled (kernel 5),
    per query head; + ``alpha * softmax(zscore(||x_j||) / temperature)`` on the current screenshot; the
    ``int((1 - keep / n) * n_prev)`` earlier-screenshot tokens best explained by the current screenshot's key basis
    zeroed per head; top ``keep - window`` + the window, the same number in every layer (``allocator: uniform``).

    ``cache``: ``query_head`` (the default, as the authors) repeats the KV heads to the query heads before
    compression and keeps one token set per query head: G x the bytes of a KV-head cache at the same budget, and
    the run's ``kv_bytes_kept`` shows it. ``kv_head`` is the GQA-aware variant (``method=guikv_gqa``, a deviation):
    the query heads' pooled scores are reduced over each KV head's group by ``gqa`` (max or mean) and the
    redundancy is measured on the KV head's own keys, so one token set per KV head is kept (1/G of the bytes).
    ``basis``: ``qr`` (the authors' QR of the current screenshot's first ``rank`` keys) or ``svd`` (its top-``rank``
    principal key subspace, ``method=guikv_svd``, a deviation).
    """

    name: str = "guikv"
    window: int = WINDOW
    cache: str = "query_head"
    kernel: int = 5
    alpha: float = ALPHA
    temperature: float = TEMPERATURE
    rank: int = RANK
    basis: str = "qr"
    gqa: str = "max"

    blockwise: ClassVar[bool] = False  # the image spans and hidden states cover the whole prompt

    def __post_init__(self) -> None:
        super().__post_init__()
        pool1d(torch.zeros(1, 8), self.kernel, "avg")  # validates the kernel with a clear message
        group_reduce(torch.zeros(1, 1), 1, self.gqa)
        if self.basis not in ("qr", "svd"):
            raise UsageError(f"basis={self.basis!r}; use 'qr' (the authors') or 'svd'")
        if self.rank < 1 or self.temperature <= 0:
            raise UsageError(f"rank={self.rank} must be >= 1 and temperature={self.temperature} > 0")

    def score(self, ctx: LayerContext) -> Tensor:
        pooled = pool1d(ctx.window_attention().sum(1), self.kernel, "avg")  # (H_q, n - w), the authors' order
        scores = ctx.group(pooled, self.gqa)  # (H, n - w): identity for a query-head cache
        images = visual_spans(ctx.spans)
        if not images or ctx.hidden_states is None:
            return scores  # no screenshot: SnapKV with the authors' settings (module docstring)
        if ctx.hidden_states.shape[0] != ctx.n:
            raise UsageError("GUI-KV scores the whole prompt in one forward (its image spans and hidden states); "
                             "run it without prefill_chunk")
        return guikv_scores(scores, ctx.hidden_states, ctx.keys, images, ctx.keep / ctx.n, self.alpha,
                            self.temperature, self.rank, self.basis).to(scores.dtype)

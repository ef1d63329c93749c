"""GUI-KV's scoring kernels as pure tensor functions (the ``Method`` is wired to the engine's VLM inputs later).

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

Deviation (documented choice): a current-screenshot span that reaches into the window is clipped to the scored
prefix (the authors' slice assignment would fail on it).
"""

from __future__ import annotations

import torch
from torch import Tensor

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
    stop = min(end, out.shape[-1])  # a span reaching into the window is clipped (see the module docstring)
    out[:, start:stop] += spatial_saliency(hidden[start:end], alpha, temperature)[: stop - start]
    if len(images) < 2:
        return out
    prev = span_positions(images[:-1])
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

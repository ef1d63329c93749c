"""Small tensor operations shared by the methods: pooling, GQA group reduction, top-k selection."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kvbench.errors import UsageError


def pool1d(x: Tensor, kernel: int, mode: str = "avg", work: Workspace | None = None) -> Tensor:
    """Smooth scores along the last (key) axis with stride 1 and padding kernel//2.

    ``avg`` uses zero padding with count_include_pad (edge values divided by the full kernel), ``max`` pads with
    -inf, exactly as ``F.avg_pool1d`` / ``F.max_pool1d`` do in the authors' code. kernel <= 1 returns x unchanged.
    x: (..., m) -> (..., m).

    Computed as ``kernel`` shifted adds (or maxima) of the padded input, in the order and accumulator dtype (fp32
    for half types) of PyTorch's pooling kernels, so the result equals ``F.avg_pool1d`` / ``F.max_pool1d`` bit for
    bit (tests/test_fast_scoring.py) at a fraction of their CPU cost on the (rows, long m) shapes the methods pool.
    With ``work`` the padded input is built in its reused ``pool1d`` buffer (the result is always a fresh tensor).
    """
    if kernel <= 1 or mode == "none":
        return x
    if kernel % 2 == 0:
        raise UsageError(f"pooling kernel must be odd to keep the length, got {kernel}")
    if mode not in ("avg", "max"):
        raise UsageError(f"unknown pooling {mode!r}: use 'avg', 'max' or 'none'")
    m, r = x.shape[-1], kernel // 2
    if mode == "max":
        padded = _padded(x, r, float("-inf"), x.dtype, work)  # (..., m + 2r)
        out = torch.maximum(padded[..., :m], padded[..., 1 : m + 1])
        for i in range(2, kernel):
            torch.maximum(out, padded[..., i : i + m], out=out)
        return out
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype  # fp32 accumulator
    padded = _padded(x, r, 0.0, acc, work)
    out = padded[..., :m] + padded[..., 1 : m + 1]  # window terms added left to right, as the pooling kernels do
    for i in range(2, kernel):
        out.add_(padded[..., i : i + m])
    return out.div_(kernel).to(x.dtype)


def _padded(x: Tensor, r: int, value: float, dtype: torch.dtype, work: Workspace | None) -> Tensor:
    """x (..., m) padded with ``r`` entries of ``value`` on both sides, in ``dtype``: (..., m + 2r)."""
    if work is None:
        return F.pad(x.to(dtype), (r, r), value=value)
    out = work.get("pool1d", (*x.shape[:-1], x.shape[-1] + 2 * r), x.device, dtype)
    out[..., :r].fill_(value)
    out[..., -r:].fill_(value)
    out[..., r:-r].copy_(x)
    return out


def variance(x: Tensor, dim: int, work: Workspace | None = None) -> Tensor:
    """Unbiased variance over ``dim`` (``torch.var``'s default), two-pass in float64, cast back to x's dtype.

    ``torch.var`` over a strided axis (the window queries of (H, w, m) attention) runs a scalar Welford loop that
    costs more than the rest of a method's scoring on CPU; the two-pass sum in float64 gives the same value to
    within rounding of the float64 accumulation (tests/test_fast_scoring.py) at a small fraction of the time. With
    ``work`` the float64 copy goes to its reused ``variance`` buffer (a fresh 2 MiB one per layer costs more in page
    faults than the arithmetic); the deviations are then taken in place, the same values bit for bit.
    """
    if work is None:
        xd = x.to(torch.float64, copy=True)
    else:
        xd = work.get("variance", tuple(x.shape), x.device, torch.float64).copy_(x)
    xd.sub_(xd.mean(dim, keepdim=True)).square_()  # (x - mean)^2, in place
    return (xd.sum(dim) / (x.shape[dim] - 1)).to(x.dtype)


def group_reduce(x: Tensor, n_kv_heads: int, how: str = "mean") -> Tensor:
    """Combine the G query heads of each KV head: (H_q, ...) -> (H_kv, ...), with mean, max or sum."""
    g = x.shape[0] // n_kv_heads
    grouped = x.reshape(n_kv_heads, g, *x.shape[1:])  # (H_kv, G, ...); query head i belongs to KV head i // G
    if how == "mean":
        return grouped.mean(1)
    if how == "max":
        return grouped.amax(1)
    if how == "sum":
        return grouped.sum(1)
    raise UsageError(f"unknown GQA reduction {how!r}: use 'mean', 'max' or 'sum'")


def topk_per_head(scores: Tensor, counts: Tensor) -> list[Tensor]:
    """Indices of the ``counts[h]`` highest scores of each row, as a set in ascending index order (cache order).
    scores (H, m), counts (H,) -> H index tensors.

    Ties at a row's boundary go to the lower index, as a stable descending sort keeps them. One ``topk`` of the
    largest count gives that set whenever no tie straddles the boundary (2-3x cheaper than the sort on CPU);
    otherwise, or with NaN scores, the stable sort itself is used."""
    h, m = scores.shape
    c = counts.clamp(0, m).tolist()
    if h == 0 or max(c) == 0:
        return [scores.new_zeros(0, dtype=torch.long) for _ in range(h)]
    s, n = scores.float(), counts.clamp(0, m).to(scores.device, torch.long)  # n (H,): counts, scores' device
    vals, idx = s.topk(max(c), dim=-1)  # (H, max c), descending
    kth = vals.gather(1, (n.clamp_min(1) - 1)[:, None])  # (H, 1) each row's boundary value
    inside = (vals == kth) & (torch.arange(vals.shape[1], device=vals.device) < n[:, None])  # ties among the picks
    straddles = ((s == kth).sum(1) > inside.sum(1)) & (n > 0)  # (H,) the boundary splits ties
    if bool((s.isnan().any(1) | straddles).any()):
        order = s.argsort(dim=-1, descending=True, stable=True)  # (H, m); ties -> lower index first
        return [order[k, :ck].sort().values for k, ck in enumerate(c)]
    return [idx[k, :ck].sort().values for k, ck in enumerate(c)]


def stable_ranks(scores: Tensor) -> Tensor:
    """(H, m) scores -> (H, m) long: each entry's place in its row's stable descending order (ties: the lower index
    first; NaN first, as the sort puts it). ``ranks < counts[:, None]`` marks the sets ``topk_per_head`` returns."""
    order = scores.float().argsort(dim=-1, descending=True, stable=True)  # (H, m)
    places = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, places)


class Workspace:
    """Scratch buffers that outlive one call, by name: ``get(name, shape, device)`` -> an uninitialised view.

    On CPU a fresh large tensor is mapped afresh by the C allocator and page-faulted on first write on every call
    (a 4 MiB probability buffer costs about as much as the softmax written into it); a buffer kept here is faulted
    in once and only grows. On other devices the framework's caching allocator already reuses memory, so ``get``
    returns a fresh ``torch.empty`` and nothing is held.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32
            ) -> Tensor:
        if torch.device(device).type != "cpu":
            return torch.empty(shape, device=device, dtype=dtype)
        size, key = math.prod(shape), (name, torch.device(device), dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < size:
            buf = self._buffers[key] = torch.empty(size, device=device, dtype=dtype)
        return buf[:size].view(shape)

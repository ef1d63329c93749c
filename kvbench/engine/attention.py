"""Attention kernels of the engine: full causal prefill, and attention over ragged per-head caches.

Backends: ``sdpa`` (torch's scaled_dot_product_attention; on GPU it dispatches to its FlashAttention-2 kernel when
no mask is needed, and to the memory-efficient kernel for the padded ragged case), ``eager`` (plain fp32 softmax,
the reference) and ``flash_attention_2`` (the flash-attn package: ``flash_attn_func`` for prefill and
``flash_attn_varlen_func`` over the cache's buffer, one "sequence" per KV head, as in AdaKV/DefensiveKV). No
kernel gets a padded or re-packed copy of the cache: decode attends over views of the store's buffers.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kvbench.engine.store import LayerKV
from kvbench.errors import UsageError

BACKENDS = ("sdpa", "eager", "flash_attention_2")


def flash_attn_available() -> bool:
    """True when the flash-attn package is importable and a CUDA device is present."""
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def check_backend(name: str) -> str:
    """Validate an ``attn_implementation`` value with one clear message."""
    if name not in BACKENDS:
        raise UsageError(f"attn_implementation={name!r} is not supported; choose one of {', '.join(BACKENDS)}")
    if name == "flash_attention_2" and not flash_attn_available():
        raise UsageError(
            "attn_implementation=flash_attention_2 needs the flash-attn package and a CUDA GPU, and they are not "
            "available here. Use model.attn_implementation=sdpa (torch's SDPA, which runs its own FlashAttention-2 "
            "kernel on GPU), or install flash-attn on the GPU node."
        )
    return name


def _eager(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """q (1, Hq, q, d), k/v (1, Hkv, L, d), mask bool (1, Hq|1, q, L) True = attend -> (1, Hq, q, d)."""
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (1, Hq, q, L)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.matmul(logits.softmax(-1), v.float()).to(q.dtype)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool = False) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str) -> Tensor:
    """Prefill over a fresh cache. q (1, Hq, n, d), k/v (1, Hkv, n, d) -> (1, n, Hq, d)."""
    if backend == "flash_attention_2":
        from flash_attn import flash_attn_func

        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (1, n, H, d)
        return flash_attn_func(qt, kt, vt, causal=True, softmax_scale=scale)
    if backend == "eager":
        n = q.shape[2]
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[None, None]
        return _eager(q, k, v, mask, scale).transpose(1, 2)
    return _sdpa(q, k, v, None, scale, causal=True).transpose(1, 2)


def ragged_mask(lens: Tensor, q_len: int) -> Tensor:
    """Bottom-right causal mask over a padded ragged cache: (H, q_len, Lmax) bool, True = attend.

    The q new tokens sit at the end of every head's segment: query t sees head h's entries j < len_h - q_len + t + 1.
    """
    lmax = int(lens.max())
    j = torch.arange(lmax, device=lens.device)  # (Lmax,)
    t = torch.arange(q_len, device=lens.device)  # (q,)
    limit = lens[:, None] - q_len + t[None, :] + 1  # (H, q)
    return j[None, None, :] < limit[:, :, None]


def _grouped(q: Tensor, k: Tensor, v: Tensor, scale: float, attend: Callable[..., Tensor]) -> Tensor:
    """The G query heads of each KV head folded into the query axis, so no kernel expands K/V for GQA.

    q (H, G, q, d), k/v (H, L, d) (any strides; the q new tokens are the last q keys) -> (H, G, q, d)."""
    h, g, q_len, d = q.shape
    mask = None
    if q_len > 1:  # bottom-right causal per row (g, t): the same (q, L) mask for every g
        mask = ragged_mask(torch.tensor([k.shape[1]], device=q.device), q_len)[0].repeat(g, 1)[None, None]
    out = attend(q.reshape(1, h, g * q_len, d), k[None], v[None], mask, scale)  # (1, H, G*q, d_v)
    return out.reshape(h, g, q_len, -1)


def cached_attention(q: Tensor, layer: LayerKV, scale: float, backend: str) -> Tensor:
    """Attention of q new tokens (already appended to ``layer``) over the layer's cache, with no copy of it.

    q (Hq, q, d) -> (q, Hq, d). Uniform layers: one call over the ``(H, L, d)`` strided views of the buffer.
    Ragged layers: one call per KV head over its contiguous ``(len_h, d)`` segment (CPU/SDPA/eager), or
    ``flash_attn_varlen_func`` over the buffer with one sequence per KV head (``varlen_attention``). Exact: the
    same softmax over the same entries as attending each head alone.
    """
    if backend == "flash_attention_2":
        from flash_attn import flash_attn_varlen_func

        return varlen_attention(q, layer, scale, flash_attn_varlen_func)
    attend = _eager if backend == "eager" else _sdpa
    h, q_len = layer.n_heads, q.shape[1]
    qg = q.reshape(h, q.shape[0] // h, q_len, -1)  # (H, G, q, d)
    if layer.uniform:
        k, v = layer.dense()  # (H, L, d) views, no copy
        out = _grouped(qg, k, v, scale, attend)
    else:
        out = torch.cat([_grouped(qg[i : i + 1], k[None], v[None], scale, attend)
                         for i, (k, v, _) in enumerate(map(layer.head, range(h)))])  # (H, G, q, d_v)
    return out.reshape(q.shape[0], q_len, -1).transpose(0, 1)


def varlen_layout(layer: LayerKV, q_len: int, g: int) -> tuple[Tensor, Tensor, int, int, bool]:
    """cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k and causal for ``flash_attn_varlen_func`` over the
    layer's buffer as it is (no copy): head h is one sequence (its filled rows), and the slack between two heads is
    a sequence of its own with no queries. A decode step (q_len = 1) folds head h's G query heads into G query rows
    of one head, attending to everything (causal=False): flash-attn's GQA path for max_seqlen_q = 1 assumes one
    query per sequence and fails with empty ones (Dao-AILab/flash-attention#1537). Longer steps keep the G heads and
    use its bottom-right causal mask. Query rows: (H*G, 1, d) for decode, (H*q, G, d) otherwise."""
    keys, _, starts, lens = layer.storage()
    bounds = [b for s, n in zip(starts, lens, strict=True) for b in (s, s + n)]  # data h, gap h, data h+1, ...
    rows = g if q_len == 1 else q_len  # query rows of one data sequence
    cu_q = [r for h in range(len(lens)) for r in (h * rows, (h + 1) * rows)]
    max_k = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))  # gaps included: flash sizes work by it
    as_int = {"dtype": torch.int32, "device": keys.device}
    return torch.tensor(cu_q, **as_int), torch.tensor(bounds, **as_int), rows, max_k, q_len > 1


def varlen_attention(q: Tensor, layer: LayerKV, scale: float, varlen_fn: Callable[..., Tensor]) -> Tensor:
    """Ragged attention through a ``flash_attn_varlen_func``-compatible function on the layout of ``varlen_layout``.
    q (Hq, q, d) -> (q, Hq, d)."""
    h, q_len = layer.n_heads, q.shape[1]
    g = q.shape[0] // h
    keys, values, starts, lens = layer.storage()
    end = starts[-1] + lens[-1]
    cu_q, cu_k, max_q, max_k, causal = varlen_layout(layer, q_len, g)
    if q_len == 1:
        qv = q.reshape(h * g, 1, -1)  # (H*G, 1, d): G query rows per KV head
    else:
        qv = q.reshape(h, g, q_len, -1).permute(0, 2, 1, 3).reshape(h * q_len, g, -1)  # (H*q, G, d)
    out = varlen_fn(qv, keys[:end, None], values[:end, None], cu_q, cu_k, max_q, max_k,
                    softmax_scale=scale, causal=causal)
    if q_len == 1:
        return out.reshape(1, h * g, -1)
    return out.reshape(h, q_len, g, -1).permute(1, 0, 2, 3).reshape(q_len, h * g, -1)


def varlen_reference(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
    softmax_scale: float, causal: bool,
) -> Tensor:
    """CPU reference with ``flash_attn_varlen_func`` semantics (bottom-right causal), used to test the layout; it
    also refuses what flash-attn 2 refuses or silently misreads. q (Tq, Hq, d), k/v (Tk, Hk, d) -> (Tq, Hq, d)."""
    n_q, n_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    if len(cu_q) != len(cu_k) or int(cu_q[0]) != 0 or int(cu_k[0]) != 0 or (n_q < 0).any() or (n_k < 0).any():
        raise ValueError("cu_seqlens must start at 0, be non-decreasing and have one entry per sequence + 1")
    if int(cu_q[-1]) != q.shape[0] or int(cu_k[-1]) > k.shape[0] or int(n_q.max()) > max_q or int(n_k.max()) > max_k:
        raise ValueError("cu_seqlens or max_seqlen do not fit the tensors")
    if max_q == 1 and q.shape[1] > k.shape[1] and q.shape[0] != len(cu_q) - 1:
        raise ValueError("flash-attn's GQA decode path needs exactly one query per sequence (flash-attention#1537)")
    if causal and bool(((n_q > 0) & (n_k < n_q)).any()):
        raise ValueError("a causal sequence with fewer keys than queries")
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if qe == qs:
            continue
        qi, ki, vi = q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1), v[ks:ke].transpose(0, 1)
        mask = ragged_mask(torch.tensor([ke - ks]), qe - qs)[None] if causal else None
        out[qs:qe] = _eager(qi[None], ki[None], vi[None], mask, softmax_scale)[0].transpose(0, 1)
    return out


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, chunk: int = 1024) -> Tensor:
    """Prefill under an arbitrary mask (e.g. a block mask for a sensitivity profile), exact fp32, in query chunks.

    q (1, Hq, n, d), k/v (1, Hkv, n, d), mask (n, n) bool, True = attend -> (1, n, Hq, d).
    """
    out = [_eager(q[:, :, s : s + chunk], k, v, mask[None, None, s : s + chunk], scale)
           for s in range(0, q.shape[2], chunk)]
    return torch.cat(out, 2).transpose(1, 2)

"""Attention kernels of the engine: full causal prefill, and attention over ragged per-head caches.

Backends: ``sdpa`` (torch's scaled_dot_product_attention; on GPU it dispatches to its FlashAttention-2 kernel when
no mask is needed, and to the memory-efficient kernel for the padded ragged case), ``eager`` (plain fp32 softmax,
the reference) and ``flash_attention_2`` (the flash-attn package: ``flash_attn_func`` for prefill and
``flash_attn_varlen_func`` over the flattened ragged cache, one "sequence" per KV head, as in AdaKV/DefensiveKV).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kvbench.engine.store import LayerKV, cu_from_lens, ragged_index
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


def pad_ragged(layer: LayerKV) -> tuple[Tensor, Tensor]:
    """Flat ragged keys/values -> zero-padded (H, Lmax, d) copies (transient; the cache itself stays flat)."""
    heads, pos = ragged_index(layer.lens)
    lmax = int(layer.lens.max())
    shape = (layer.n_heads, lmax)
    k = layer.keys.new_zeros(*shape, layer.keys.shape[-1])
    v = layer.values.new_zeros(*shape, layer.values.shape[-1])
    k[heads, pos] = layer.keys
    v[heads, pos] = layer.values
    return k, v


def cached_attention(q: Tensor, layer: LayerKV, scale: float, backend: str) -> Tensor:
    """Attention of q new tokens (already appended to ``layer``) over the layer's cache.

    q (Hq, q, d) -> (q, Hq, d). Exact for ragged per-head lengths: padded keys with a per-head mask on CPU/SDPA,
    ``flash_attn_varlen_func`` with one sequence per KV head when flash-attn is the backend.
    """
    q_len = q.shape[1]
    if backend == "flash_attention_2":
        from flash_attn import flash_attn_varlen_func

        return varlen_attention(q, layer, scale, flash_attn_varlen_func)
    attend = _eager if backend == "eager" else _sdpa
    if layer.uniform:
        k, v = layer.dense()  # (H, L, d) views, no copy
        mask = None if q_len == 1 else ragged_mask(layer.lens[:1], q_len)[None]  # (1, 1, q, L)
    else:
        k, v = pad_ragged(layer)
        g = q.shape[0] // layer.n_heads
        mask = ragged_mask(layer.lens, q_len).repeat_interleave(g, 0)[None]  # (1, Hq, q, Lmax)
    out = attend(q[None], k[None], v[None], mask, scale)  # (1, Hq, q, d)
    return out[0].transpose(0, 1)


def varlen_attention(q: Tensor, layer: LayerKV, scale: float, varlen_fn: Callable[..., Tensor]) -> Tensor:
    """Ragged attention through a ``flash_attn_varlen_func``-compatible function: each KV head is one sequence
    whose q_len queries carry the G query heads of that group. q (Hq, q, d) -> (q, Hq, d)."""
    h, q_len = layer.n_heads, q.shape[1]
    g = q.shape[0] // h
    qv = q.reshape(h, g, q_len, -1).permute(0, 2, 1, 3).reshape(h * q_len, g, -1)  # (H*q, G, d)
    cu_q = torch.arange(h + 1, device=q.device, dtype=torch.int32) * q_len
    cu_k = cu_from_lens(layer.lens).to(torch.int32)
    out = varlen_fn(
        qv, layer.keys[:, None], layer.values[:, None], cu_q, cu_k, q_len, int(layer.lens.max()),
        softmax_scale=scale, causal=True,
    )  # (H*q, G, d)
    return out.reshape(h, q_len, g, -1).permute(1, 0, 2, 3).reshape(q_len, h * g, -1)


def varlen_reference(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
    softmax_scale: float, causal: bool,
) -> Tensor:
    """CPU reference with ``flash_attn_varlen_func`` semantics (bottom-right causal), used to test the layout.
    q (Tq, Hq, d), k/v (Tk, Hk, d) -> (Tq, Hq, d)."""
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
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

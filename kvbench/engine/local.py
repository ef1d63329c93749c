"""Sliding-window (local) attention layers: attention within the window, and how much of the cache they keep.

A local layer with window W lets the query at position p see the keys at positions p - W < k <= p
(transformers' ``sliding_window_overlay``: W keys including itself). The engine therefore needs at most the last
W - 1 tokens of such a layer before a forward; it trims a local layer back to them once it exceeds
``W - 1 + slack`` entries (``slack = max(1, W // 4)``: the copy is amortised over ``slack`` tokens, and a local
layer never holds more than 1.25 W entries). Per-layer policy: methods compress the global layers; a local layer
keeps exactly its window (it is bounded already, and what lies outside it is never attended again). Local layers
are never ragged: every KV head keeps the same window, and they hold it in the model's dtype under every method
(a quantising method such as ``kivi`` quantises the global layers only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def window_slack(window: int) -> int:
    return max(1, window // 4)


def window_mask(q_pos: Tensor, k_pos: Tensor, window: int) -> Tensor:
    """(q, L) bool, True = attend: causal and within the window, from the tokens' original positions."""
    diff = q_pos[:, None].long() - k_pos[None, :].long()  # (q, L)
    return (diff >= 0) & (diff < window)


def local_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int, scale: float,
                    backend: str) -> Tensor:
    """q (1, Hq, q, d), k/v (1, Hkv, L, d) with positions q_pos (q,), k_pos (L,) -> (1, q, Hq, d)."""
    if backend == "flash_attention_2":  # keys of a local layer are contiguous and end at the last query
        from flash_attn import flash_attn_func

        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return flash_attn_func(qt, kt, vt, causal=True, softmax_scale=scale, window_size=(window - 1, 0))
    mask = window_mask(q_pos, k_pos, window)[None, None]  # (1, 1, q, L)
    if backend == "eager":
        g = q.shape[1] // k.shape[1]
        kr, vr = k.repeat_interleave(g, 1).float(), v.repeat_interleave(g, 1).float()
        logits = (q.float() @ kr.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
        return (logits.softmax(-1) @ vr).to(q.dtype).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def needs_trim(length: int, window: int) -> bool:
    return length > window - 1 + window_slack(window)


def last_tokens(length: int, window: int, n_heads: int, device: torch.device) -> list[Tensor]:
    """Within-head indices of the last W - 1 tokens of every head (what a local layer keeps)."""
    keep = torch.arange(max(0, length - (window - 1)), length, device=device)
    return [keep] * n_heads

"""Infinity's 2-D rotary position embedding (``precompute_rope2d_freqs_grid`` / ``apply_rotary_emb`` of
FoundationVision/Infinity ``infinity/models/basic.py``, MIT), applied to q and k before they are cached, so that the
cached keys are post-RoPE as in Infinity.

For head dim d: ``inv_freq_i = base^(-2i / (d/2))``, i < d/4. Channel pair p = (2p, 2p + 1) of a head is rotated by
``inv_freq_p * row`` for p < d/4 and by ``inv_freq_(p - d/4) * col`` for the rest (pairs are adjacent channels).
Positions (``normalized_by_hw=2``, the released models' "star" mode): a token at (i, j) of a scale with side s sits
at ``round(i * E / s), round(j * E / s)`` on the template's final grid of side E (64 for 1:1), so that spatially
aligned tokens of every scale share positions. ``normalized_by_hw=0`` uses the raw (i, j). Mode 1 (bilinear
interpolation of the angle grid) is not implemented (one message).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvbench.errors import UsageError


def grid_positions(side: int, extent: int, mode: int) -> Tensor:
    """(side^2, 2) float (row, col) RoPE positions of a scale's tokens in raster order."""
    if mode == 2:
        idx = (torch.arange(side) * (extent / side)).round()
    elif mode == 0:
        idx = torch.arange(side, dtype=torch.float32)
    else:
        raise UsageError(f"rope2d_normalized_by_hw={mode}: only 0 and 2 (the released models') are implemented")
    return torch.stack([idx.repeat_interleave(side), idx.repeat(side)], dim=1)


def rope_tables(head_dim: int, sides: tuple[int, ...], extent: int, mode: int = 2,
                base: float = 10000.0) -> list[tuple[Tensor, Tensor]]:
    """Per scale: cos, sin (side^2, d/2) of every channel pair's angle."""
    if head_dim % 4:
        raise UsageError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / base ** (torch.arange(0, half, 2, dtype=torch.float32) / half)  # (d/4,)
    out = []
    for s in sides:
        pos = grid_positions(s, extent, mode)  # (l, 2)
        angles = torch.cat([pos[:, :1] * inv_freq, pos[:, 1:] * inv_freq], dim=1)  # (l, d/2)
        out.append((angles.cos(), angles.sin()))
    return out


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., l, d) rotated pairwise by cos/sin (l, d/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., l, d/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([cos * a - sin * b, sin * a + cos * b], dim=-1).flatten(-2).to(x.dtype)

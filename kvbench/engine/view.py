"""What a method scores: one layer's cache as dense (H, n, d) tensors, also when its heads hold different lengths.

A uniform layer is viewed as it is stored (free views). A ragged layer (per-head lengths, after a head-adaptive
allocator compressed it) is **left-padded** to its longest head: head h's tokens occupy the last ``len_h`` columns,
so the observation window (the newest tokens, appended to every head alike) is the last w columns of every head,
and the ``(H, n - w)`` score contract of ``Method.score`` holds unchanged. Padded keys are masked out of every
softmax (``LayerContext.key_mask``) and their scores are set to -inf before selection. Left padding with zero
attention is exactly the zero padding that SnapKV-style avg-pooling (count_include_pad) and max-pooling (of
non-negative scores) apply at the start of a sequence, so a head's scores equal those of the head scored alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvbench.engine.store import LayerKV


@dataclass
class LayerView:
    """keys/values (H, n, d); positions (n,) for a uniform layer, (H, n) with -1 at padding for a ragged one;
    pad (H,) leading padding columns per head, or None when the layer is uniform."""

    keys: Tensor
    values: Tensor
    positions: Tensor
    pad: Tensor | None = None


def layer_view(layer: LayerKV) -> LayerView:
    """The dense view of a layer for scoring: free for a uniform layer, a left-padded copy for a ragged one."""
    if layer.uniform:
        keys, values = layer.dense()
        return LayerView(keys, values, layer.head(0)[2])
    n = int(layer.lens.max())
    k0, v0, p0 = layer.head(0)  # views, for dtype and device (the flat .keys may be a compact copy)
    h = layer.n_heads
    keys = k0.new_zeros(h, n, k0.shape[-1])
    values = v0.new_zeros(h, n, v0.shape[-1])
    positions = p0.new_full((h, n), -1)
    for i in range(h):  # H slices per compression step (not per token)
        k, v, p = layer.head(i)
        keys[i, n - len(p) :], values[i, n - len(p) :], positions[i, n - len(p) :] = k, v, p
    return LayerView(keys, values, positions, pad=n - layer.lens)


def mask_padding(scores: Tensor, pad: Tensor | None) -> Tensor:
    """scores (H, m) over the first m columns of a view; padding columns -> -inf (never selected)."""
    if pad is None:
        return scores
    cols = torch.arange(scores.shape[-1], device=scores.device)
    return scores.masked_fill(cols[None, :] < pad[:, None].to(scores.device), float("-inf"))


def valid_candidates(m: int, n_heads: int, pad: Tensor | None) -> Tensor:
    """(H,) real (non-padding) tokens among each head's first m view columns."""
    full = torch.full((n_heads,), m, dtype=torch.long)
    return full if pad is None else (full - pad.cpu()).clamp_min(0)


def head_indices(picks: list[Tensor], pad: Tensor | None) -> list[Tensor]:
    """View columns of every head -> within-head token indices (what ``LayerKV.select`` takes)."""
    if pad is None:
        return picks
    return [idx - int(p) for idx, p in zip(picks, pad.tolist(), strict=True)]

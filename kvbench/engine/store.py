"""Physical KV storage with a different number of tokens per KV head (ragged, head-major, flattened).

Each layer holds its keys/values as flat ``(T, d)`` tensors, ``T = sum_h len_h``, with head ``h`` occupying rows
``cu[h]:cu[h+1]`` in token order. When every head has the same length the flat tensor is a free ``(H, L, d)`` view,
so uniform-budget methods pay nothing for the generality. Only the kept entries are held: the bytes reported are
the bytes of these tensors. Batch size is 1 (one sample at a time, as in kvpress and the authors' harnesses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def cu_from_lens(lens: Tensor) -> Tensor:
    """(H,) lengths -> (H+1,) cumulative offsets starting at 0."""
    return torch.cat([lens.new_zeros(1), lens.cumsum(0)])


def ragged_index(lens: Tensor) -> tuple[Tensor, Tensor]:
    """Head id and within-head position of every flat row: two (T,) tensors."""
    heads = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens)
    starts = cu_from_lens(lens)[:-1]
    pos = torch.arange(int(lens.sum()), device=lens.device) - starts[heads]
    return heads, pos


@dataclass
class LayerKV:
    """One layer's cache: flat keys/values (T, d), per-head lengths (H,), original positions (T,)."""

    keys: Tensor
    values: Tensor
    lens: Tensor
    positions: Tensor

    @classmethod
    def from_dense(cls, keys: Tensor, values: Tensor, positions: Tensor) -> LayerKV:
        """keys/values (H, n, d), positions (n,) -> a layer where every head holds the n tokens."""
        h, n, d = keys.shape
        lens = torch.full((h,), n, dtype=torch.long, device=keys.device)
        pos = positions.to(torch.int32).repeat(h)
        return cls(keys.reshape(h * n, d), values.reshape(h * n, values.shape[-1]), lens, pos)

    @property
    def n_heads(self) -> int:
        return len(self.lens)

    @property
    def uniform(self) -> bool:
        return bool((self.lens == self.lens[0]).all())

    def nbytes(self) -> int:
        """Bytes held by keys and values (positions are bookkeeping, not KV)."""
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def dense(self) -> tuple[Tensor, Tensor]:
        """(H, L, d) views of keys and values; only valid when all heads have the same length L."""
        h, length = self.n_heads, int(self.lens[0])  # explicit last dims: a layer may hold 0 tokens per head
        return self.keys.view(h, length, self.keys.shape[-1]), self.values.view(h, length, self.values.shape[-1])

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Append q new tokens to every head. keys/values (H, q, d), positions (q,)."""
        h, q, _ = keys.shape
        if self.uniform:  # fast path: stays a dense (H, L+q, d) block
            k, v = self.dense()
            length = k.shape[1]
            self.keys = torch.cat([k, keys], dim=1).reshape(h * (length + q), -1)
            self.values = torch.cat([v, values], dim=1).reshape(h * (length + q), -1)
            pos = self.positions.view(h, length)
            self.positions = torch.cat([pos, positions.to(pos.dtype).expand(h, q)], 1).reshape(-1)
            self.lens = self.lens + q
            return
        new_lens = self.lens + q
        new_cu = cu_from_lens(new_lens)
        heads, pos = ragged_index(self.lens)
        old_rows = new_cu[heads] + pos  # (T,) destination of every stored row
        new_rows = (new_cu[:-1, None] + self.lens[:, None] + torch.arange(q, device=keys.device)).reshape(-1)  # (H*q,)
        self.keys = _scatter_rows(self.keys, keys.reshape(h * q, -1), old_rows, new_rows)
        self.values = _scatter_rows(self.values, values.reshape(h * q, -1), old_rows, new_rows)
        new_pos = positions.to(self.positions.dtype).repeat(h)
        self.positions = _scatter_rows(self.positions[:, None], new_pos[:, None], old_rows, new_rows)[:, 0]
        self.lens = new_lens

    def select(self, keep: list[Tensor]) -> None:
        """Keep, for each head h, the within-head token indices ``keep[h]`` (sorted here, any order accepted)."""
        cu = cu_from_lens(self.lens)
        rows = torch.cat([cu[h] + idx.sort().values for h, idx in enumerate(keep)])  # (T',)
        self.keys = self.keys[rows]
        self.values = self.values[rows]
        self.positions = self.positions[rows]
        self.lens = torch.tensor([len(i) for i in keep], dtype=torch.long, device=self.lens.device)

    def truncate(self, lens: Tensor) -> None:
        """Drop the newest tokens of each head so that head h keeps its first ``lens[h]`` entries."""
        heads, pos = ragged_index(self.lens)
        rows = (pos < lens[heads]).nonzero().squeeze(1)
        self.keys, self.values, self.positions = self.keys[rows], self.values[rows], self.positions[rows]
        self.lens = lens.clone()

    def clone(self) -> LayerKV:
        return LayerKV(self.keys.clone(), self.values.clone(), self.lens.clone(), self.positions.clone())

    def head(self, h: int) -> tuple[Tensor, Tensor, Tensor]:
        """Keys (len_h, d), values (len_h, d) and positions (len_h,) of one head."""
        cu = cu_from_lens(self.lens)
        s, e = int(cu[h]), int(cu[h + 1])
        return self.keys[s:e], self.values[s:e], self.positions[s:e]


def _scatter_rows(old: Tensor, new: Tensor, old_rows: Tensor, new_rows: Tensor) -> Tensor:
    out = old.new_empty((old.shape[0] + new.shape[0], old.shape[1]))
    out[old_rows] = old
    out[new_rows] = new
    return out


@dataclass
class KVStore:
    """The whole model's cache: one ``LayerKV`` per decoder layer, plus byte accounting.

    ``next_position`` is the logical (uncompressed) length: new tokens get RoPE positions from here on,
    whatever was evicted. ``peak_bytes`` is the largest total held at any moment since the last ``reset_peak``.
    """

    n_layers: int
    layers: list[LayerKV | None] = field(default_factory=list)
    next_position: int = 0
    peak_bytes: int = 0

    def __post_init__(self) -> None:
        if not self.layers:
            self.layers = [None] * self.n_layers

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers if layer is not None)

    def track_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.nbytes())

    def reset_peak(self) -> None:
        self.peak_bytes = self.nbytes()

    def n_entries(self) -> int:
        """Number of (head, token) entries held over all layers."""
        return sum(int(layer.lens.sum()) for layer in self.layers if layer is not None)

    def lengths(self) -> list[list[int]]:
        """Per layer, per KV head, the number of tokens held."""
        return [layer.lens.tolist() if layer is not None else [] for layer in self.layers]

    def snapshot(self, copy: bool = False) -> tuple[list[Any], int]:
        """What ``rollback`` needs to return to this point: per-layer lengths and the logical length, or with
        ``copy`` a copy of every layer (needed when tokens held now may be evicted before the rollback, as with
        decode-time eviction; costs one more compressed cache)."""
        if copy:
            return [None if layer is None else layer.clone() for layer in self.layers], self.next_position
        return [None if layer is None else layer.lens.clone() for layer in self.layers], self.next_position

    def rollback(self, snap: tuple[list[Any], int]) -> None:
        """Forget every token appended (and undo every eviction, for a copied snapshot) since ``snap``."""
        saved, self.next_position = snap
        for i, (layer, kept) in enumerate(zip(self.layers, saved, strict=True)):
            if kept is not None and not isinstance(kept, Tensor):  # a copied layer (any layer kind)
                self.layers[i] = kept.clone()
            elif layer is not None and kept is not None and not torch.equal(layer.lens, kept):
                layer.truncate(kept)

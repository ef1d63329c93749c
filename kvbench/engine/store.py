"""Physical KV storage with a different number of tokens per KV head (ragged, head-major), grown in place.

Layout. Each layer holds one flat buffer per tensor: keys ``(C, d_k)``, values ``(C, d_v)``, positions ``(C,)``,
``C = sum_h cap_h``. Head ``h`` owns rows ``start_h : start_h + cap_h``; its first ``len_h`` rows are filled, in
token order (a contiguous ``(len_h, d)`` view), and the rest is that head's slack for appends. Every head gets the
same slack, so when all heads hold the same length L their capacities are equal too and the buffer is an
``(H, cap, d)`` block whose filled part is a strided ``(H, L, d)`` view: uniform-budget methods pay nothing for
the generality. Batch size is 1 (one sample at a time, as in kvpress and the authors' harnesses).

Growth. An append that does not fit reallocates every head to ``need_h + slack`` rows, ``need_h = len_h + q`` and
``slack = max(ceil((GROWTH - 1) * sum_h need_h / H), MIN_SLACK)``: the total capacity grows by ``GROWTH`` (x1.5)
each time, so n appends reallocate O(log n) times and copy O(1) rows per appended row on average; appends in
between write q rows per head in place. ``select`` (compression) always builds a new buffer sized by the same rule
from the kept lengths (capacity <= GROWTH x kept + H x MIN_SLACK rows), so a compressed cache never keeps the full
prompt's buffer alive. ``truncate`` (rollback, probes) only shortens heads and keeps the buffer, unless the kept
part falls under half of it (then it compacts by the growth rule).

Bytes. ``nbytes()`` counts the kept entries (what the cache logically holds; the figure every method is compared
on); ``allocated_bytes()`` counts the capacity (what the allocator really reserved).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import torch
from torch import Tensor

GROWTH = 1.5  # capacity factor of a reallocation (total rows after = GROWTH x rows needed, at least MIN_SLACK/head)
MIN_SLACK = 16  # rows of slack per head at least, so short heads do not reallocate every few tokens


def cu_from_lens(lens: Tensor) -> Tensor:
    """(H,) lengths -> (H+1,) cumulative offsets starting at 0."""
    return torch.cat([lens.new_zeros(1), lens.cumsum(0)])


def ragged_index(lens: Tensor) -> tuple[Tensor, Tensor]:
    """Head id and within-head position of every row of a tight flat layout: two (T,) tensors."""
    heads = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens)
    starts = cu_from_lens(lens)[:-1]
    pos = torch.arange(int(lens.sum()), device=lens.device) - starts[heads]
    return heads, pos


def capacities(lens: list[int]) -> list[int]:
    """Per-head capacities for heads that must hold ``lens`` rows: the rows plus one common slack (module doc)."""
    slack = max(math.ceil((GROWTH - 1) * sum(lens) / max(len(lens), 1)), MIN_SLACK)
    return [n + slack for n in lens]


def _starts(caps: list[int]) -> list[int]:
    return [0, *accumulate(caps)][:-1]


class LayerKV:
    """One layer's cache, ragged over KV heads, grown in place with amortised capacity (module doc).

    Public surface (the quantised store mirrors it):

    - ``LayerKV(keys, values, lens, positions)``: flat head-major ``keys (T, d_k)``, ``values (T, d_v)``,
      ``positions (T,)`` and per-head lengths ``lens (H,)``; the tensors are borrowed, never written to.
    - ``from_dense(keys, values, positions)``: keys/values ``(H, n, d)``, positions ``(n,)``; every head holds n.
    - ``append(keys, values, positions)``, ``select(keep)``, ``truncate(lens)``, ``clone()``, ``share()``.
    - ``n_heads``, ``uniform``, ``lens`` (a read-only ``(H,)`` long tensor on the cache's device),
      ``nbytes()`` (kept entries), ``allocated_bytes()`` (capacity).
    - Views, never copies: ``dense()`` (uniform layers: ``(H, L, d)`` strided views of the buffer),
      ``head(h)`` (contiguous ``(len_h, d)``, ``(len_h, d)``, ``(len_h,)``) and ``storage()`` (the raw buffers and
      the segment layout, for kernels).
    - ``keys``, ``values``, ``positions``: the flat head-major ``(T, d)`` / ``(T,)`` tensors of the kept entries, as
      before. They are views when the layer has no slack (right after construction or ``clone``) and compact copies
      otherwise, so they are for inspection and cold paths; hot paths use the views above.

    Views stay valid until the next mutating call: ``append`` writes past every head's end only, but a later
    ``truncate`` followed by ``append`` overwrites rows a view of the longer layer still sees.
    """

    def __init__(self, keys: Tensor, values: Tensor, lens: Tensor, positions: Tensor) -> None:
        n = [int(x) for x in lens.tolist()]
        if not (keys.shape[0] == values.shape[0] == positions.shape[0] == sum(n)):
            raise ValueError(f"LayerKV: {keys.shape[0]} key rows, {values.shape[0]} value rows, "
                             f"{positions.shape[0]} positions for lengths summing to {sum(n)}")
        self._set(keys, values, positions, n, list(n), owned=False)

    def _set(self, k: Tensor, v: Tensor, pos: Tensor, lens: list[int], caps: list[int], owned: bool) -> None:
        """Install buffers (C, d), (C, d), (C,) with the segment layout ``caps``; ``owned``: may be written to."""
        self._k, self._v, self._pos, self._cap, self._start, self._owned = k, v, pos, caps, _starts(caps), owned
        self._row_bytes = k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size()  # one key + one value
        self._set_lens(lens)

    def _set_lens(self, lens: list[int]) -> None:
        self._len, self._total, self._lens_t = lens, sum(lens), None

    @classmethod
    def from_dense(cls, keys: Tensor, values: Tensor, positions: Tensor) -> LayerKV:
        """keys/values (H, n, d), positions (n,) -> a layer where every head holds the n tokens."""
        h, n, d = keys.shape
        lens = torch.full((h,), n, dtype=torch.long)
        pos = positions.to(torch.int32).repeat(h)
        return cls(keys.reshape(h * n, d), values.reshape(h * n, values.shape[-1]), lens, pos)

    # -- shape and bytes ----------------------------------------------------------------------------------------
    @property
    def n_heads(self) -> int:
        return len(self._len)

    @property
    def uniform(self) -> bool:
        return all(n == self._len[0] for n in self._len)

    @property
    def lens(self) -> Tensor:
        """(H,) long tensor on the cache's device; read-only (a cached tensor rebuilt after each change)."""
        if self._lens_t is None:
            self._lens_t = torch.tensor(self._len, dtype=torch.long, device=self._k.device)
        return self._lens_t

    def nbytes(self) -> int:
        """Bytes of the kept keys and values (positions are bookkeeping, not KV)."""
        return self._total * self._row_bytes

    def allocated_bytes(self) -> int:
        """Bytes of the key and value buffers, slack included."""
        return self._k.shape[0] * self._row_bytes

    # -- views --------------------------------------------------------------------------------------------------
    def dense(self) -> tuple[Tensor, Tensor]:
        """(H, L, d) views of keys and values; only valid when all heads have the same length L."""
        if not self.uniform:
            raise ValueError(f"dense() needs the same length on every head, got {self._len}")
        return self._block(self._k)[:, : self._len[0]], self._block(self._v)[:, : self._len[0]]

    def _block(self, buf: Tensor) -> Tensor:
        """A buffer of equal capacities as (H, cap, ...)."""
        return buf.view(self.n_heads, self._cap[0], *buf.shape[1:])

    def head(self, h: int) -> tuple[Tensor, Tensor, Tensor]:
        """Keys (len_h, d), values (len_h, d) and positions (len_h,) of one head: views of the buffer."""
        s, e = self._start[h], self._start[h] + self._len[h]
        return self._k[s:e], self._v[s:e], self._pos[s:e]

    def storage(self) -> tuple[Tensor, Tensor, list[int], list[int]]:
        """Key buffer (C, d_k), value buffer (C, d_v), and per head its first row and length: head h's entries are
        rows ``starts[h] : starts[h] + lens[h]``; rows between segments are slack (unspecified values)."""
        return self._k, self._v, list(self._start), list(self._len)

    @property
    def keys(self) -> Tensor:
        """Flat head-major (T, d_k) keys of the kept entries: a view of the buffer when the layer has no slack (or
        one head), a compact copy otherwise. Never write to it."""
        return self._flat(self._k)

    @property
    def values(self) -> Tensor:
        return self._flat(self._v)

    @property
    def positions(self) -> Tensor:
        """(T,) original positions, head-major like ``keys``."""
        return self._flat(self._pos)

    def _tight(self) -> bool:
        return self._cap == self._len

    def _flat(self, buf: Tensor) -> Tensor:
        if self._tight():
            return buf
        if self.uniform:
            return self._block(buf)[:, : self._len[0]].reshape(self._total, *buf.shape[1:])
        return torch.cat([buf[s : s + n] for s, n in zip(self._start, self._len, strict=True)])

    # -- changes ------------------------------------------------------------------------------------------------
    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Append q new tokens to every head, in place when every head has room.

        keys/values (H, q, d), positions (q,)."""
        q = keys.shape[1]
        if not (self._owned and all(n + q <= c for n, c in zip(self._len, self._cap, strict=True))):
            self._reallocate(capacities([n + q for n in self._len]))
        pos = positions.to(self._pos.dtype).expand(self.n_heads, q)  # (H, q)
        if self.uniform:  # equal capacities: one strided write per tensor
            end = self._len[0]
            for buf, new in ((self._k, keys), (self._v, values), (self._pos, pos)):
                self._block(buf)[:, end : end + q] = new
        else:
            dev = self._k.device
            ends = torch.tensor([s + n for s, n in zip(self._start, self._len, strict=True)], device=dev)  # (H,)
            rows = (ends[:, None] + torch.arange(q, device=dev)).reshape(-1)  # (H*q,) destinations, head-major
            self._k.index_copy_(0, rows, keys.reshape(-1, keys.shape[-1]))
            self._v.index_copy_(0, rows, values.reshape(-1, values.shape[-1]))
            self._pos.index_copy_(0, rows, pos.reshape(-1))
        self._set_lens([n + q for n in self._len])

    def _reallocate(self, caps: list[int]) -> None:
        """Move the filled rows into fresh owned buffers with capacities ``caps`` (>= the lengths)."""
        new = [buf.new_empty((sum(caps), *buf.shape[1:])) for buf in (self._k, self._v, self._pos)]
        if self.uniform and len(set(caps)) == 1 and len(set(self._cap)) == 1:
            end, h = self._len[0], self.n_heads
            for old, buf in zip((self._k, self._v, self._pos), new, strict=True):
                buf.view(h, caps[0], *buf.shape[1:])[:, :end] = self._block(old)[:, :end]
        else:
            for s_new, s, n in zip(_starts(caps), self._start, self._len, strict=True):
                for old, buf in zip((self._k, self._v, self._pos), new, strict=True):
                    buf[s_new : s_new + n] = old[s : s + n]
        self._set(*new, self._len, caps, owned=True)

    def select(self, keep: list[Tensor]) -> None:
        """Keep, for each head h, the within-head token indices ``keep[h]`` (sorted here, any order accepted).

        Builds a new buffer of the kept size plus the growth rule's slack, each head's rows gathered straight into
        its segment (``index_select``: several times faster than advanced indexing for row gathers on CPU); the old
        buffer is released."""
        lens = [len(i) for i in keep]
        caps = capacities(lens)
        bufs = (self._k, self._v, self._pos)
        new = [buf.new_empty((sum(caps), *buf.shape[1:])) for buf in bufs]
        for h, (idx, start) in enumerate(zip(keep, _starts(caps), strict=True)):
            src = idx.to(self._k.device).sort().values + self._start[h]  # (len_h,) old buffer rows, token order
            for buf, out in zip(bufs, new, strict=True):
                torch.index_select(buf, 0, src, out=out[start : start + lens[h]])
        self._set(*new, lens, caps, owned=True)

    def truncate(self, lens: Tensor) -> None:
        """Drop the newest tokens of each head so that head h keeps its first ``lens[h]`` entries.

        Keeps the buffer (a rollback is then free) unless the kept rows fall under half of it, or the heads become
        equal in length over unequal capacities (then compacts by the growth rule, so ``dense()`` stays a view)."""
        new = [int(x) for x in lens.tolist()]
        if any(n > m for n, m in zip(new, self._len, strict=True)):
            raise ValueError(f"truncate({new}) would lengthen heads of lengths {self._len}")
        self._set_lens(new)
        oversized = 2 * self._total < sum(self._cap) - self.n_heads * MIN_SLACK
        if oversized or (self.uniform and len(set(self._cap)) > 1):
            self._reallocate(capacities(new))

    def clone(self) -> LayerKV:
        """An independent copy holding only the kept entries (no slack)."""
        out = LayerKV.__new__(LayerKV)
        k, v, p = (torch.cat([buf[s : s + n] for s, n in zip(self._start, self._len, strict=True)])
                   for buf in (self._k, self._v, self._pos))  # cat always copies
        out._set(k, v, p, list(self._len), list(self._len), owned=True)
        return out

    def share(self) -> LayerKV:
        """A copy-on-write fork: both layers share the buffer until either one writes (its next ``append``, or a
        compacting ``truncate``, then moves it to a buffer of its own). Costs nothing now."""
        self._owned = False
        return copy.copy(self)


@dataclass
class KVStore:
    """The whole model's cache: one ``LayerKV`` per decoder layer, plus byte accounting.

    ``next_position`` is the logical (uncompressed) length: new tokens get RoPE positions from here on,
    whatever was evicted. ``peak_bytes`` is the largest total held at any moment since the last ``reset_peak``
    (kept entries, ``nbytes``); ``peak_allocated_bytes`` the same for the buffers' capacity (``allocated_bytes``).
    """

    n_layers: int
    layers: list[LayerKV | None] = field(default_factory=list)
    next_position: int = 0
    peak_bytes: int = 0
    peak_allocated_bytes: int = 0

    def __post_init__(self) -> None:
        if not self.layers:
            self.layers = [None] * self.n_layers

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers if layer is not None)

    def allocated_bytes(self) -> int:
        """Bytes reserved by the layers' buffers (kept entries plus growth slack); shared forks count in each."""
        return sum(layer.allocated_bytes() for layer in self.layers if layer is not None)

    def track_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.nbytes())
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes())

    def reset_peak(self) -> None:
        self.peak_bytes = self.nbytes()
        self.peak_allocated_bytes = self.allocated_bytes()

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

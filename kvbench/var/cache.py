"""VAR's KV cache in kvbench's store: one ``LayerKV`` per block, CFG streams x heads as its rows.

A block's cache holds R = S * H rows, S = 2B streams (rows [0, B) conditional, [B, 2B) unconditional, as VAR's
doubled batch) times H heads; row ``s * H + h`` is head h of stream s. Both streams are held and counted in the
bytes. Each scale step appends the scale's pn^2 keys/values to every row (positions = the tokens' index in VAR's
flattened sequence of L = sum pn^2 tokens), then the scale's queries attend over every cached entry of their row:
block-causal across scales, bidirectional within one, no mask (VAR's ``attn_bias=None`` inference). Rows may hold
different numbers of tokens after a compression (per-head budgets); attention then pads each row's keys and
masks the padding, which is exact. Infinity's keys arrive post-RoPE (its cache holds rotated keys); its text
cross-attention K/V are the condition, counted in ``condition_bytes``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kvbench.engine.store import LayerKV, ragged_index


def scale_spans(patch_nums: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """Token ranges [start, end) of every scale in VAR's flattened sequence, plus the condition (the first scale's
    start token, which carries the class embedding): {"condition": (0, 1), "scale_0": (0, 1), "scale_1": (1, 5)...}."""
    spans, start = {"condition": (0, patch_nums[0] ** 2)}, 0
    for i, p in enumerate(patch_nums):
        spans[f"scale_{i}"] = (start, start + p * p)
        start += p * p
    return spans


def padded(layer: LayerKV) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ragged rows -> keys (R, n, d), values (R, n, d), positions (R, n) (-1 on padding), valid (R, n) bool,
    n = the longest row. Free views when every row has the same length."""
    if layer.uniform:
        k, v = layer.dense()
        pos = layer.positions.view(layer.n_heads, -1).long()
        return k, v, pos, torch.ones(pos.shape, dtype=torch.bool, device=pos.device)
    r, n = layer.n_heads, int(layer.lens.max())
    rows, cols = ragged_index(layer.lens)
    k = layer.keys.new_zeros(r, n, layer.keys.shape[-1])
    v = layer.values.new_zeros(r, n, layer.values.shape[-1])
    pos = torch.full((r, n), -1, dtype=torch.long, device=layer.keys.device)
    k[rows, cols], v[rows, cols], pos[rows, cols] = layer.keys, layer.values, layer.positions.long()
    return k, v, pos, pos >= 0


@dataclass
class StepRecord:
    """What one scale step did to the cache."""

    step: int
    tokens: int  # pn^2 appended per row
    entries_before: int  # (row, token) entries held after the appends, before compression
    entries_after: int
    bytes_before: int
    bytes_after: int
    attention_s: float  # wall time inside the blocks' attention (append + attend), summed over blocks


@dataclass
class VarKVCache:
    """The cache of one generation: blocks x (streams x heads) rows."""

    n_blocks: int
    n_streams: int
    n_heads: int
    patch_nums: tuple[int, ...]
    layers: list[LayerKV | None] = field(default_factory=list)
    queries: list[Tensor | None] = field(default_factory=list)  # per block: (R, l, d) of the current step
    step: int = -1
    offset: int = 0  # tokens of the finished scales (the logical length before this step)
    peak_bytes: int = 0
    attention_s: float = 0.0
    records: list[StepRecord] = field(default_factory=list)
    synchronize: bool = False  # cuda: synchronise around attention so that attention_s is device time
    condition_bytes: int = 0  # cross-attention K/V of a text condition (Infinity), both streams: computed once,
    # held for the whole generation and never compressed; counted apart from the cache's bytes

    def __post_init__(self) -> None:
        self.layers = [None] * self.n_blocks
        self.queries = [None] * self.n_blocks
        self.spans = scale_spans(self.patch_nums)

    @property
    def rows(self) -> int:
        return self.n_streams * self.n_heads

    def begin_step(self, step: int) -> None:
        self.step, self.attention_s = step, 0.0

    def tokens_seen(self) -> int:
        """Logical length once the current step's scale is appended (L_s = sum of pn^2 up to step s)."""
        return self.offset + self.patch_nums[self.step] ** 2

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers if layer is not None)

    def n_entries(self) -> int:
        return sum(int(layer.lens.sum()) for layer in self.layers if layer is not None)

    def attend(self, block_idx: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """Append this scale's k/v (S, H, l, d) to block ``block_idx`` and attend with q over its whole cache."""
        self._sync()
        t0 = time.perf_counter()
        s, h, n, d = q.shape
        q, k, v = q.reshape(s * h, n, d), k.reshape(s * h, n, d), v.reshape(s * h, n, -1)
        pos = torch.arange(self.offset, self.offset + n, device=q.device)
        layer = self.layers[block_idx]
        if layer is None:
            self.layers[block_idx] = layer = LayerKV.from_dense(k, v, pos)
        else:
            layer.append(k, v, pos)
        self.peak_bytes = max(self.peak_bytes, self.nbytes())
        self.queries[block_idx] = q
        out = self._attention(layer, q, scale)
        self._sync()
        self.attention_s += time.perf_counter() - t0
        return out.view(s, h, n, -1)

    @staticmethod
    def _attention(layer: LayerKV, q: Tensor, scale: float) -> Tensor:
        """q (R, l, d) over the layer's rows -> (R, l, d); padded rows are masked (exact)."""
        if layer.uniform:
            k, v = layer.dense()
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        k, v, _, valid = padded(layer)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, :], scale=scale)

    def end_step(self, before: tuple[int, int]) -> None:
        """Close the step: record it and move the logical offset past its scale. ``before``: (entries, bytes)
        after the appends, before any compression."""
        n = self.patch_nums[self.step] ** 2
        self.records.append(StepRecord(self.step, n, before[0], self.n_entries(), before[1], self.nbytes(),
                                       self.attention_s))
        self.offset += n

    def _sync(self) -> None:
        if self.synchronize:
            torch.cuda.synchronize()

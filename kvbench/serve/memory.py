"""KV allocators: who holds which physical memory. Every allocator accounts in bytes and never goes negative.

* :class:`PagedBlocks`: vLLM's block manager: a pool of fixed ``block_tokens`` blocks, a LIFO free list, one
  block appended at a time as a sequence grows, so concurrent sequences interleave and a sequence's blocks end up
  scattered (each non-adjacent block is its own copy call when swapped);
* :class:`BlockGroups`: FastSwitch's dynamic block-group manager: a sequence reserves contiguous groups (its whole
  prompt at once, then ``group_blocks`` at a time), still block-addressed, so a swap copies a few large chunks;
* :class:`VirtualPages`: vAttention: a sequence's K and V of every layer are contiguous in virtual memory and
  physical pages of ``page_bytes`` are mapped as it grows (``2 * layers`` page rows per sequence).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field


def contiguous_runs(blocks: list[int]) -> int:
    """Maximal runs of consecutive ids: the copy calls needed to move these blocks in order."""
    return sum(1 for i, b in enumerate(blocks) if i == 0 or b != blocks[i - 1] + 1)


@dataclass
class PagedBlocks:
    n_blocks: int
    block_tokens: int
    bytes_per_token: int
    free: list[int] = field(init=False)
    owned: dict[int, list[int]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.n_blocks <= 0:
            raise ValueError("the KV pool holds no block: the model's weights leave no memory for KV")
        self.free = list(range(self.n_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ... first

    @property
    def block_bytes(self) -> int:
        return self.block_tokens * self.bytes_per_token

    @property
    def unit_bytes(self) -> int:
        """Bytes of one allocation unit (what ``units_for`` counts)."""
        return self.block_bytes

    @property
    def capacity(self) -> int:
        return self.n_blocks * self.block_bytes

    @property
    def used(self) -> int:
        return (self.n_blocks - len(self.free)) * self.block_bytes

    def units_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_tokens)

    def missing(self, sid: int, tokens: int) -> int:
        """Blocks the sequence must still get to hold ``tokens``."""
        return max(self.units_for(tokens) - len(self.owned.get(sid, ())), 0)

    def fits(self, sid: int, tokens: int, reserve: int = 0) -> bool:
        return self.missing(sid, tokens) + reserve <= len(self.free)

    def grow(self, sid: int, tokens: int) -> bool:
        need = self.missing(sid, tokens)
        if need > len(self.free):
            return False
        blocks = self.owned.setdefault(sid, [])
        blocks.extend(self.free.pop() for _ in range(need))
        return True

    def release(self, sid: int) -> None:
        self.free.extend(reversed(self.owned.pop(sid, [])))

    def held(self, sid: int) -> int:
        return len(self.owned.get(sid, ())) * self.block_bytes

    def blocks(self, sid: int) -> list[int]:
        return self.owned.get(sid, [])

    def runs(self, sid: int, from_token: int = 0) -> int:
        """Copy calls (per layer and K/V) to move the sequence's blocks from token ``from_token`` on."""
        return contiguous_runs(self.blocks(sid)[from_token // self.block_tokens:])


@dataclass
class BlockGroups(PagedBlocks):
    """Blocks handed out as contiguous groups from a list of free extents (first fit, neighbours merged)."""

    group_blocks: int = 8
    extents: list[list[int]] = field(default_factory=list, init=False)  # sorted [start, length]
    reserved: dict[int, int] = field(default_factory=dict, init=False)  # blocks each sequence reserved

    def __post_init__(self) -> None:
        super().__post_init__()
        self.free = []  # unused: extents hold the free space
        self.extents = [[0, self.n_blocks]]

    @property
    def n_free(self) -> int:
        return sum(n for _, n in self.extents)

    @property
    def used(self) -> int:
        return (self.n_blocks - self.n_free) * self.block_bytes

    def fits(self, sid: int, tokens: int, reserve: int = 0) -> bool:
        return self.missing(sid, tokens) + reserve <= self.n_free

    def take(self, n: int) -> list[int]:
        """n blocks, from one extent when one is large enough (first fit), else from the largest ones."""
        for ext in self.extents:
            if ext[1] >= n:
                start = ext[0]
                ext[0], ext[1] = ext[0] + n, ext[1] - n
                self.extents = [e for e in self.extents if e[1] > 0]
                return list(range(start, start + n))
        out: list[int] = []
        for ext in sorted(self.extents, key=lambda e: -e[1]):
            k = min(ext[1], n - len(out))
            out.extend(range(ext[0], ext[0] + k))
            ext[0], ext[1] = ext[0] + k, ext[1] - k
            if len(out) == n:
                break
        self.extents = [e for e in self.extents if e[1] > 0]
        return sorted(out)

    def grow(self, sid: int, tokens: int) -> bool:
        need = self.missing(sid, tokens)
        if need > self.n_free:
            return False
        if need:
            group = min(max(need, self.group_blocks), self.n_free)  # a whole group when memory allows
            self.owned.setdefault(sid, []).extend(self.take(group))
        return True

    def release(self, sid: int) -> None:
        for b in self.owned.pop(sid, []):
            i = bisect.bisect(self.extents, [b, 0])
            self.extents.insert(i, [b, 1])
        merged: list[list[int]] = []
        for start, n in self.extents:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1][1] += n
            else:
                merged.append([start, n])
        self.extents = merged


@dataclass
class VirtualPages:
    """Physical pages mapped per (layer, K/V) row of a sequence: held = 2 * layers * pages * page_bytes."""

    capacity: int  # bytes of physical memory for KV
    page_bytes: int
    bytes_per_token_layer: int  # one layer's K (or V) of one token
    layers: int
    pages: dict[int, int] = field(default_factory=dict, init=False)  # pages per row of each sequence
    mapped_total: int = field(default=0, init=False)  # pages mapped so far (a counter the system reads)

    def __post_init__(self) -> None:
        if self.page_bytes < self.bytes_per_token_layer:
            raise ValueError(f"page of {self.page_bytes} B is smaller than one token's K of a layer")

    @property
    def rows(self) -> int:
        return 2 * self.layers

    @property
    def unit_bytes(self) -> int:
        """One more page in every (layer, K/V) row."""
        return self.rows * self.page_bytes

    @property
    def used(self) -> int:
        return sum(self.pages.values()) * self.rows * self.page_bytes

    def units_for(self, tokens: int) -> int:
        return math.ceil(tokens * self.bytes_per_token_layer / self.page_bytes)

    def missing(self, sid: int, tokens: int) -> int:
        return max(self.units_for(tokens) - self.pages.get(sid, 0), 0)

    def fits(self, sid: int, tokens: int, reserve: int = 0) -> bool:
        extra = (self.missing(sid, tokens) + reserve) * self.rows * self.page_bytes
        return self.used + extra <= self.capacity

    def grow(self, sid: int, tokens: int) -> bool:
        if not self.fits(sid, tokens):
            return False
        need = self.missing(sid, tokens)
        self.pages[sid] = self.pages.get(sid, 0) + need
        self.mapped_total += need * self.rows
        return True

    def release(self, sid: int) -> None:
        self.pages.pop(sid, None)

    def held(self, sid: int) -> int:
        return self.pages.get(sid, 0) * self.rows * self.page_bytes

    def runs(self, sid: int, from_token: int = 0) -> int:
        return 1  # one contiguous virtual range per row

"""vAttention's KV store, for real, on CPU: contiguous virtual K/V, physical pages only where tokens are written.

Each (layer, K/V, batch slot) row is a contiguous ``[max_seq, kv_heads, head_dim]`` range of one anonymous
``mmap`` reservation (no backing: ``MAP_PRIVATE | MAP_ANONYMOUS``, which Linux backs lazily), so a layer's K is
one ``[max_batch, max_seq, kv_heads, head_dim]`` tensor as in vAttention. Writing a token touches its page and the
kernel maps it (the CPU analogue of vAttention's ``cuMemMap`` in ``step_async``); :meth:`free` gives a finished
slot's pages back with ``madvise(MADV_DONTNEED)`` (vAttention's ``free_batch_idx``). Physical memory is the
mapping's ``Rss`` in ``/proc/self/smaps``. Transparent huge pages are turned off for the mapping
(``MADV_NOHUGEPAGE``) so pages are the base page size (4 KiB here; vAttention's are 2 MiB or 64 KiB on a GPU).

Attention runs over ``keys(layer, slot)``, a strided view of the reservation, with the unchanged SDPA kernel;
:func:`attention_times` compares it with a paged layout (16-token blocks gathered through a block table).
"""

from __future__ import annotations

import math
import mmap
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812

PAGE = os.sysconf("SC_PAGE_SIZE")


def mapping_rss(addr: int) -> int:
    """Resident bytes of the mapping starting at ``addr`` (``Rss`` of its ``/proc/self/smaps`` entry)."""
    found = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and ":" not in head:
                found = int(head.split("-")[0], 16) == addr
            elif found and head == "Rss:":
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no mapping at {addr:#x} in /proc/self/smaps")


class DemandPagedKV:
    def __init__(self, layers: int, max_batch: int, max_seq: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32) -> None:
        self.layers, self.max_batch, self.max_seq = layers, max_batch, max_seq
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        item = torch.empty((), dtype=dtype).element_size()
        self.token_bytes = kv_heads * head_dim * item  # one token of one row
        self.row_bytes = math.ceil(max_seq * self.token_bytes / PAGE) * PAGE  # rows start on page boundaries
        self.reserved = layers * 2 * max_batch * self.row_bytes
        self.mm = mmap.mmap(-1, self.reserved, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.mm.madvise(mmap.MADV_NOHUGEPAGE)
        self.flat = torch.frombuffer(self.mm, dtype=dtype)  # (reserved / item,), no copy
        self.addr = self.flat.data_ptr()
        self.lens = [0] * max_batch

    def offset(self, layer: int, kv: int, slot: int) -> int:
        """Byte offset of a row."""
        return ((layer * 2 + kv) * self.max_batch + slot) * self.row_bytes

    def row(self, layer: int, kv: int, slot: int) -> torch.Tensor:
        """(max_seq, kv_heads, head_dim) view of one row."""
        start = self.offset(layer, kv, slot) // self.flat.element_size()
        n = self.max_seq * self.kv_heads * self.head_dim
        return self.flat[start:start + n].view(self.max_seq, self.kv_heads, self.head_dim)

    def append(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys / values (layers, q, kv_heads, head_dim) of q new tokens of the sequence in ``slot``."""
        q, n = keys.shape[1], self.lens[slot]
        if n + q > self.max_seq:
            raise ValueError(f"slot {slot}: {n + q} tokens exceed max_seq={self.max_seq}")
        for layer in range(self.layers):
            self.row(layer, 0, slot)[n:n + q] = keys[layer]
            self.row(layer, 1, slot)[n:n + q] = values[layer]
        self.lens[slot] = n + q

    def keys(self, layer: int, slot: int) -> torch.Tensor:
        return self.row(layer, 0, slot)[: self.lens[slot]]

    def values(self, layer: int, slot: int) -> torch.Tensor:
        return self.row(layer, 1, slot)[: self.lens[slot]]

    def free(self, slot: int) -> None:
        """Return the slot's physical pages to the OS (the virtual range stays reserved for the next request)."""
        for layer in range(self.layers):
            for kv in (0, 1):
                self.mm.madvise(mmap.MADV_DONTNEED, self.offset(layer, kv, slot), self.row_bytes)
        self.lens[slot] = 0

    def rss(self) -> int:
        return mapping_rss(self.addr)

    def expected_pages(self) -> int:
        """Pages the written tokens occupy: per row ceil(len * token_bytes / page)."""
        return 2 * self.layers * sum(math.ceil(n * self.token_bytes / PAGE) for n in self.lens)

    def paged_bytes(self, block_tokens: int = 16) -> int:
        """What a paged block allocator holds for the same sequences (whole blocks)."""
        return 2 * self.layers * sum(math.ceil(n / block_tokens) * block_tokens for n in self.lens) * self.token_bytes


@dataclass(frozen=True)
class AttentionTimes:
    contiguous_s: float
    paged_s: float

    @property
    def factor(self) -> float:
        return self.paged_s / self.contiguous_s


def attention_times(store: DemandPagedKV, slot: int, heads: int, block_tokens: int = 16, repeats: int = 20,
                    seed: int = 0) -> AttentionTimes:
    """One decode query over a slot's layer-0 cache: SDPA on the contiguous view vs SDPA after gathering the same
    tokens from scattered 16-token blocks through a block table (a paged kernel's extra indirection on CPU)."""
    g = torch.Generator().manual_seed(seed)
    k, v = store.keys(0, slot), store.values(0, slot)  # (n, kv_heads, d), strided views of the reservation
    n = k.shape[0]
    q = torch.randn(1, heads, 1, store.head_dim, generator=g, dtype=store.dtype)
    n_blocks = math.ceil(n / block_tokens)
    pool_k = torch.zeros(4 * n_blocks, block_tokens, store.kv_heads, store.head_dim, dtype=store.dtype)
    pool_v = torch.zeros_like(pool_k)
    table = torch.randperm(4 * n_blocks, generator=g)[:n_blocks]
    padded = n_blocks * block_tokens
    pool_k[table] = F.pad(k, (0, 0, 0, 0, 0, padded - n)).view(n_blocks, block_tokens, store.kv_heads, -1)
    pool_v[table] = F.pad(v, (0, 0, 0, 0, 0, padded - n)).view(n_blocks, block_tokens, store.kv_heads, -1)

    def contiguous() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k.transpose(0, 1)[None], v.transpose(0, 1)[None], enable_gqa=True)

    def paged() -> torch.Tensor:
        kk = pool_k[table].reshape(padded, store.kv_heads, -1)[:n]
        vv = pool_v[table].reshape(padded, store.kv_heads, -1)[:n]
        return F.scaled_dot_product_attention(q, kk.transpose(0, 1)[None], vv.transpose(0, 1)[None], enable_gqa=True)

    torch.testing.assert_close(contiguous(), paged())  # the same attention either way
    return AttentionTimes(*best_times((contiguous, paged), repeats))


def best_times(fns: tuple[object, ...], repeats: int) -> list[float]:
    """The best of ``repeats`` calls of each function, calls interleaved (a burst of load on a shared machine then
    slows both, not one)."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [min(ts) for ts in times]


def demo(layers: int = 3, kv_heads: int = 2, head_dim: int = 64, heads: int = 4, max_batch: int = 8,
         max_seq: int = 8192, lengths: tuple[int, ...] = (1000, 37, 4096, 513), seed: int = 0) -> dict[str, float]:
    """Fill a store with sequences of ``lengths`` (the embedded model's shape by default), measure RSS against
    reserved, against the tokens held and against a paged allocator, then free one slot; time attention."""
    torch.set_num_threads(1)
    store = DemandPagedKV(layers, max_batch, max_seq, kv_heads, head_dim)
    g = torch.Generator().manual_seed(seed)
    rss0 = store.rss()
    for slot, n in enumerate(lengths):
        for start in range(0, n, 256):  # grown in steps, as prefill chunks and decode steps would
            q = min(256, n - start)
            store.append(slot, torch.randn(layers, q, kv_heads, head_dim, generator=g),
                         torch.randn(layers, q, kv_heads, head_dim, generator=g))
    rss = store.rss()
    tokens_bytes = 2 * layers * sum(lengths) * store.token_bytes
    times = attention_times(store, lengths.index(max(lengths)), heads)
    expected, paged = store.expected_pages() * PAGE, store.paged_bytes()
    store.free(0)
    return {"page_bytes": PAGE, "reserved_bytes": store.reserved, "rss_before_bytes": rss0, "rss_bytes": rss,
            "expected_rss_bytes": expected, "tokens_bytes": tokens_bytes, "paged_bytes": paged,
            "rss_after_free_bytes": store.rss(), "expected_after_free_bytes": store.expected_pages() * PAGE,
            "slack_pages_per_row": (rss - tokens_bytes) / PAGE / (2 * layers * len(lengths)),
            "attn_contiguous_s": times.contiguous_s, "attn_paged_s": times.paged_s, "paged_attn_factor": times.factor}

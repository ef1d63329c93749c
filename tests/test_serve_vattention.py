"""vAttention: the real demand-paged store (page counts and RSS), its attention against a paged gather, the
page accounting of the simulator, and decode throughput above the paged baseline."""

from __future__ import annotations

import copy
import math

import torch
from test_serve_helpers import ctx_for

from kvbench.serve.memory import VirtualPages
from kvbench.serve.vattention import VAttention
from kvbench.serve.vmem import PAGE, DemandPagedKV, attention_times
from kvbench.serve.workload import build_requests


def test_demand_paging_maps_only_the_pages_tokens_touch_and_frees_them() -> None:
    # a token of one row: 2 heads x 64 x 4 B = 512 B, so 8 tokens per 4 KiB page
    store = DemandPagedKV(layers=2, max_batch=4, max_seq=4096, kv_heads=2, head_dim=64)
    assert store.reserved == 2 * 2 * 4 * 4096 * 512 and store.rss() == 0  # reserved, nothing backed
    g = torch.Generator().manual_seed(0)
    for slot, n in ((0, 100), (1, 37)):
        for start in range(0, n, 16):
            q = min(16, n - start)
            store.append(slot, torch.randn(2, q, 2, 64, generator=g), torch.randn(2, q, 2, 64, generator=g))
    pages = 2 * 2 * (math.ceil(100 * 512 / PAGE) + math.ceil(37 * 512 / PAGE))
    assert store.expected_pages() == pages == 2 * 2 * (13 + 5)
    assert store.rss() == pages * PAGE
    tokens = 2 * 2 * (100 + 37) * 512
    assert tokens <= store.rss() <= tokens + 2 * 2 * 2 * PAGE  # within one page per layer, K/V and request
    k = store.keys(1, 0)
    assert k.shape == (100, 2, 64) and k.data_ptr() == store.flat.data_ptr() + store.offset(1, 0, 0)
    store.free(0)
    assert store.rss() == 2 * 2 * 5 * PAGE and store.lens[0] == 0


def test_contiguous_attention_equals_the_paged_gather_and_is_faster_on_cpu() -> None:
    store = DemandPagedKV(layers=1, max_batch=1, max_seq=4096, kv_heads=2, head_dim=64)
    store.append(0, torch.randn(1, 3000, 2, 64), torch.randn(1, 3000, 2, 64))
    t = attention_times(store, 0, heads=4, repeats=10)  # asserts the outputs are equal
    assert t.factor > 1, "the gather through a block table costs extra on CPU"


def test_virtual_pages_hold_whole_pages_per_layer_row() -> None:
    _, ctx = ctx_for("arch=yi-6b")
    a = ctx.arch
    assert a.kv_bytes_per_token_layer == 4 * 128 * 2  # 1 KiB: a 2 MB page holds 2048 tokens of one row
    big = VirtualPages(10 * 2**30, 2 * 2**20, a.kv_bytes_per_token_layer, a.layers)
    small = VirtualPages(10 * 2**30, 64 * 2**10, a.kv_bytes_per_token_layer, a.layers)
    assert big.grow(0, 1500) and small.grow(0, 1500)
    assert big.held(0) == 64 * 2 * 2**20 and small.held(0) == 64 * 24 * 64 * 2**10
    assert big.mapped_total == 64 and small.mapped_total == 64 * 24
    assert big.grow(0, 2049) and big.mapped_total == 128  # the 2049th token maps one more page per row


def test_vattention_decodes_faster_than_paged_and_overlap_hides_mapping() -> None:
    cfg, ctx = ctx_for("system=vattention", "workload.n_requests=12", "workload.lengths.input=8192",
                       "workload.lengths.output=82")
    reqs = build_requests(cfg.workload, 0)
    sys_ = VAttention()
    runs = {"vattention": sys_.simulate(copy.deepcopy(reqs), ctx).metrics}
    runs |= {n: b.simulate(copy.deepcopy(reqs), ctx).metrics for n, b in sys_.baselines().items()}
    assert runs["vattention"]["decode_tok_s"] > 1.05 * runs["vllm"]["decode_tok_s"]
    rows = 2 * ctx.arch.layers * 12  # 12 requests of 8192 + 82 tokens, never preempted here
    assert runs["vattention"]["pages_mapped"] == rows * math.ceil(8274 / 2048)
    assert runs["vattention_64kb"]["pages_mapped"] == rows * math.ceil(8274 / 64)
    assert runs["vattention_64kb_sync"]["makespan_s"] > runs["vattention_64kb"]["makespan_s"]
    assert runs["vattention"]["fragmentation"] > runs["vattention_64kb"]["fragmentation"]  # bigger pages, more

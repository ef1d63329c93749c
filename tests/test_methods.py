"""Every discovered method x budgets {1.0, 0.5, 0.1} x architectures, through ``Engine.forward(ids, compress=True)``.

Methods that declare a quantised layer store (``Method.layer_store``) keep every token at reduced precision: they
run at budget 1.0 only (the engine refuses others, tested here) and their bytes and logits are checked against
formulas and a reference in tests/test_quant.py; the bit-identity and eviction checks cover the evicting methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from conftest import (
    ARCHS,
    EVICTING_METHODS,
    HEAD_DIM,
    N_HEADS,
    N_KV_HEADS,
    N_LAYERS,
    PREFILL_METHODS,
    QUANTIZED_METHODS,
    layer_store,
    load_method,
)
from torch import Tensor

from kvbench.budget import tokens_per_head
from kvbench.engine import Engine
from kvbench.errors import UsageError

N = 200
BUDGETS = (1.0, 0.5, 0.1)
DECODE_STEPS = 4


@dataclass
class Run:
    method: object
    allocator: object
    keep: int  # tokens per head (window included) the budget asks for
    compressed: bool
    lens: list[Tensor]  # per layer (H,) after prefill
    positions: list[list[list[int]]]  # per layer, per head: original positions after prefill
    shapes: list[tuple]  # per layer: keys, values, positions shapes and lens.sum()
    nbytes: int
    full_bytes: int  # the same entries in full precision
    logits: list[Tensor]  # prefill, then after every decode step
    tokens: list[int]
    lens_after: list[list[Tensor]]  # per decode step, per layer (H,)
    new_positions: list[list[list[int]]]  # per decode step, per layer: the last position of each head
    next_positions: list[int]


@pytest.fixture(scope="session")
def run(tiny_model):
    cache: dict[tuple, Run] = {}

    def get(name: str, budget: float, arch: str) -> Run:
        key = (name, budget, arch)
        if key in cache:
            return cache[key]
        method, allocator = load_method(name)
        ids = torch.randint(0, 128, (N,), generator=torch.Generator().manual_seed(7 + ARCHS.index(arch)))
        with Engine(tiny_model(arch), method, allocator, budget=budget) as eng:
            eng.reset()
            logits = [eng.forward(ids, compress=True)]
            layers = eng.store.layers
            if method.layer_store == "quantized":  # the layout of what attention reads
                layers = [ly.dequantized() for ly in layers]
            lens = [ly.lens.clone() for ly in layers]
            positions = [[ly.head(h)[2].tolist() for h in range(ly.n_heads)] for ly in layers]
            shapes = [(tuple(ly.keys.shape), tuple(ly.values.shape), tuple(ly.positions.shape), int(ly.lens.sum()))
                      for ly in layers]
            nbytes = eng.store.nbytes()
            full_bytes = eng.layer_kind.full_bytes(eng.store.layers)
            tokens, lens_after, new_pos, next_pos = [], [], [], []
            for _ in range(DECODE_STEPS):
                tokens.append(int(logits[-1].argmax()))
                logits.append(eng.forward([tokens[-1]]))
                lens_after.append([ly.lens.clone() for ly in eng.store.layers])
                new_pos.append([[int(ly.head(h)[2][-1]) for h in range(ly.n_heads)] for ly in eng.store.layers])
                next_pos.append(eng.store.next_position)
        keep = tokens_per_head(budget, N)
        compressed = method.compresses and (keep < N or method.plans)  # a plan may evict at every budget (ZipVL v2)
        cache[key] = Run(method, allocator, keep, compressed, lens, positions, shapes, nbytes,
                         full_bytes, logits, tokens, lens_after, new_pos, next_pos)
        return cache[key]

    return get


FULL_BYTES = N_LAYERS * N_KV_HEADS * N * HEAD_DIM * 4 * 2  # fp32 keys + values


def heads(r: Run) -> int:
    """Caches per layer: one per KV head, or one per query head (``cache: query_head``, G x the bytes)."""
    return N_HEADS if r.method.cache == "query_head" else N_KV_HEADS
GRID = [(m, b, a) for m in PREFILL_METHODS for b in (BUDGETS if layer_store(m) == "evict" else (1.0,)) for a in ARCHS]
COMPRESSED_GRID = [(m, b, a) for m, b, a in GRID if m != "fullkv" and b < 1]


@pytest.mark.parametrize(("name", "budget", "arch"), GRID)
def test_cache_layout_and_window(run, name, budget, arch):
    r = run(name, budget, arch)
    assert len(r.lens) == N_LAYERS
    for layer, (kshape, vshape, pshape, total) in enumerate(r.shapes):
        assert kshape == (total, HEAD_DIM) and vshape == (total, HEAD_DIM) and pshape == (total,)
        assert r.lens[layer].shape == (heads(r),)
        for h, pos in enumerate(r.positions[layer]):
            assert len(pos) == int(r.lens[layer][h])
            assert pos == sorted(set(pos)), "positions within a head are unique, in token order"
            assert all(0 <= p < N for p in pos)
            if not r.compressed:
                assert pos == list(range(N)), "no compression: every token kept at its position"
                continue
            assert 1 <= len(pos) < N
            window = min(r.method.window, r.keep)
            if r.method.keeps_window:
                assert pos[len(pos) - window:] == list(range(N - window, N)), f"layer {layer} head {h} lost its window"
    if name == "fullkv":
        assert all(ln.tolist() == [N] * N_KV_HEADS for ln in r.lens)
    if r.method.plans and r.compressed:  # one token set per layer (ZipVL's token-level sparsity)
        assert all(len(set(map(tuple, layer))) == 1 for layer in r.positions)


@pytest.mark.parametrize(("name", "budget", "arch"), COMPRESSED_GRID)
def test_counts_follow_the_allocator(run, name, budget, arch):
    r = run(name, budget, arch)
    assert r.compressed
    kind = r.allocator.name
    per_layer = [int(ln.sum()) for ln in r.lens]
    if r.method.plans:  # the plan decides (ZipVL v2: the tau rule, capped at the budget)
        assert all(len(set(ln.tolist())) == 1 and int(ln[0]) <= r.keep for ln in r.lens)
    elif kind == "uniform":
        assert all(ln.tolist() == [r.keep] * heads(r) for ln in r.lens)
    elif kind == "pyramid":
        assert all(len(set(ln.tolist())) == 1 for ln in r.lens), "pyramid: one size for all heads of a layer"
        assert per_layer == sorted(per_layer, reverse=True), "pyramid: lower layers keep more"
    elif kind in ("head_adaptive", "flat"):
        for total in per_layer:
            slack = 0 if r.allocator.alpha == 0 else N_KV_HEADS  # rounding of the safeguard
            assert abs(total - N_KV_HEADS * r.keep) <= slack
    elif kind == "taskkv":  # full heads + sinks/recent/middle, leftover redistributed: exactly H x keep per layer
        assert per_layer == [N_KV_HEADS * r.keep] * N_LAYERS
    elif kind == "cake":  # one size per layer; the layer budgets add up to L x keep unless a layer is clamped at N
        assert all(len(set(ln.tolist())) == 1 for ln in r.lens), "cake: one size for all heads of a layer"
        if max(int(ln[0]) for ln in r.lens) < N:
            assert sum(per_layer) == N_LAYERS * N_KV_HEADS * r.keep
    elif kind == "global_flat":  # one top-k over the model: exactly L x H x keep entries, split unevenly
        assert sum(per_layer) == N_LAYERS * N_KV_HEADS * r.keep
    elif kind == "error_aware":  # CompressKV: one size per layer, the layer budgets add up to L x keep (floor/cap)
        assert all(len(set(ln.tolist())) == 1 for ln in r.lens), "error_aware: one size for all heads of a layer"
        if max(int(ln[0]) for ln in r.lens) < N:
            assert sum(per_layer) == N_LAYERS * N_KV_HEADS * r.keep
    else:
        pytest.fail(f"untested allocator {kind!r}: add its expectations here")


@pytest.mark.parametrize(("name", "budget", "arch"), GRID)
def test_kv_bytes_match_budget(run, name, budget, arch):
    r = run(name, budget, arch)
    assert r.full_bytes == sum(s[3] for s in r.shapes) * HEAD_DIM * 4 * 2
    if r.method.layer_store == "quantized" and r.compressed:  # a plan evicted some entries (ZipVL v2)
        assert r.nbytes <= r.full_bytes < FULL_BYTES
        return
    if r.method.layer_store == "quantized":  # every entry kept, fewer bytes each (exact formulas: test_quant.py)
        assert r.full_bytes == FULL_BYTES and r.nbytes < 0.7 * FULL_BYTES
        return
    assert r.nbytes == r.full_bytes
    full = FULL_BYTES * heads(r) // N_KV_HEADS  # a query-head cache holds every KV head G times
    if name == "fullkv" or budget == 1.0:
        assert r.nbytes == full
    else:
        assert math.isclose(r.nbytes, budget * full, rel_tol=0.02), (r.nbytes, budget * full)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", EVICTING_METHODS)
def test_budget_one_is_bit_identical_to_fullkv(run, name, arch):
    r, ref = run(name, 1.0, arch), run("fullkv", 1.0, arch)
    assert r.tokens == ref.tokens
    for a, b in zip(r.logits, ref.logits, strict=True):
        if r.method.cache == "query_head":  # the same attention over repeated K/V, another reduction order
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize(("name", "budget", "arch"), GRID)
def test_decoding_grows_cache_by_one_per_head(run, name, budget, arch):
    r = run(name, budget, arch)
    assert all(torch.isfinite(lg).all() for lg in r.logits)
    for step in range(DECODE_STEPS):
        assert r.next_positions[step] == N + step + 1
        for layer in range(N_LAYERS):
            assert torch.equal(r.lens_after[step][layer], r.lens[layer] + step + 1)
            assert r.new_positions[step][layer] == [N + step] * heads(r)


@pytest.mark.parametrize("arch", ARCHS)
def test_compression_changes_the_output(run, arch):
    """Sanity: at budget 0.1 the decode logits of a compressing method differ from FullKV's."""
    ref = run("fullkv", 0.1, arch)
    for name in EVICTING_METHODS:
        if name != "fullkv":
            r = run(name, 0.1, arch)
            assert torch.equal(r.logits[0], ref.logits[0]), "prefill logits use the full K/V"
            assert (r.logits[1] - ref.logits[1]).abs().max() > 1e-4, name


@pytest.mark.parametrize("name", [m for m in QUANTIZED_METHODS
                                  if not load_method(m)[0].compresses and not load_method(m)[0].plans])
def test_methods_that_keep_every_token_refuse_a_token_budget(tiny_model, name):
    """Quantising methods without a plan (kivi): the budget would mean nothing. A plan method (zipvl) caps its
    high-precision tokens by it (tests/test_vlmethods.py)."""
    method, allocator = load_method(name)
    with pytest.raises(UsageError, match="budget=1.0"):
        Engine(tiny_model("llama"), method, allocator, budget=0.5)


@pytest.mark.parametrize("budget", [0.5, 0.1])
@pytest.mark.parametrize("arch", ARCHS)
def test_streamingllm_keeps_sinks_and_recent(run, arch, budget):
    if "streamingllm" not in PREFILL_METHODS:
        pytest.skip("streamingllm not configured")
    r = run("streamingllm", budget, arch)
    sinks = r.method.n_sink
    expected = list(range(sinks)) + list(range(N - (r.keep - sinks), N))
    for layer in r.positions:
        for pos in layer:
            assert pos == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_pyramid_schedule_in_engine(run, arch):
    """PyramidKV at budget 0.5 (b = 100 - 32 = 68 candidates, m = 168, L = 2): m_min = 3, m_max = 133, step = 130."""
    if "pyramidkv" not in PREFILL_METHODS:
        pytest.skip("pyramidkv not configured")
    r = run("pyramidkv", 0.5, arch)
    window = r.method.window
    assert [ln.tolist() for ln in r.lens] == [[133 + window] * N_KV_HEADS, [3 + window] * N_KV_HEADS]

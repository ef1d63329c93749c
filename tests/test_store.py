"""LayerKV grown in place: amortised capacity, views that alias the buffer, select/truncate/clone/share/rollback on
ragged layers with slack, bytes, and attention over the buffer with no copy of the cache."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kvbench.engine.attention import cached_attention, varlen_attention, varlen_reference
from kvbench.engine.store import GROWTH, MIN_SLACK, KVStore, LayerKV

D = 4


class Reference:
    """The same cache as plain per-head Python lists of rows (what a LayerKV must hold)."""

    def __init__(self, lens: list[int], seed: int = 0, d: int = D) -> None:
        g = torch.Generator().manual_seed(seed)
        self.k = [torch.randn(n, d, generator=g) for n in lens]
        self.v = [torch.randn(n, d, generator=g) for n in lens]
        self.p = [torch.arange(n, dtype=torch.int32) for n in lens]
        self.gen = g

    def layer(self) -> LayerKV:
        cat = torch.cat
        return LayerKV(cat(self.k), cat(self.v), torch.tensor([len(x) for x in self.k]), cat(self.p))

    def new(self, q: int, start: int) -> tuple[Tensor, Tensor, Tensor]:
        """q new tokens for every head (appended to the reference too)."""
        h, d = len(self.k), self.k[0].shape[1]
        k, v, p = torch.randn(h, q, d, generator=self.gen), torch.randn(h, q, d, generator=self.gen), torch.arange(
            start, start + q)
        for i in range(h):
            self.k[i], self.v[i] = torch.cat([self.k[i], k[i]]), torch.cat([self.v[i], v[i]])
            self.p[i] = torch.cat([self.p[i], p.to(torch.int32)])
        return k, v, p

    def select(self, keep: list[Tensor]) -> None:
        for i, idx in enumerate(keep):
            idx = idx.sort().values
            self.k[i], self.v[i], self.p[i] = self.k[i][idx], self.v[i][idx], self.p[i][idx]

    def truncate(self, lens: list[int]) -> None:
        for i, n in enumerate(lens):
            self.k[i], self.v[i], self.p[i] = self.k[i][:n], self.v[i][:n], self.p[i][:n]


def assert_holds(layer: LayerKV, ref: Reference) -> None:
    assert layer.lens.tolist() == [len(x) for x in ref.k]
    for h in range(layer.n_heads):
        k, v, p = layer.head(h)
        assert torch.equal(k, ref.k[h]) and torch.equal(v, ref.v[h]) and torch.equal(p, ref.p[h])
    assert torch.equal(layer.keys, torch.cat(ref.k)) and torch.equal(layer.values, torch.cat(ref.v))
    assert torch.equal(layer.positions, torch.cat(ref.p))
    if layer.uniform:
        dk, dv = layer.dense()
        assert torch.equal(dk, torch.stack(ref.k)) and torch.equal(dv, torch.stack(ref.v))


def buffer_ptr(layer: LayerKV) -> int:
    return layer.storage()[0].untyped_storage().data_ptr()


def same_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


LENS = {"uniform": [5, 5, 5], "ragged": [7, 0, 30]}


# -- growth ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LENS))
def test_appends_reallocate_a_logarithmic_number_of_times(layout):
    ref = Reference(LENS[layout])
    layer, n = ref.layer(), 3000
    moves, ptr = 0, buffer_ptr(layer)
    for t in range(n):
        layer.append(*ref.new(1, 100 + t))
        if buffer_ptr(layer) != ptr:
            moves, ptr = moves + 1, buffer_ptr(layer)
    assert_holds(layer, ref)
    total = sum(len(x) for x in ref.k)
    assert moves <= math.ceil(math.log(total / sum(LENS[layout]), GROWTH)) + 1  # about 14, not 3000
    assert moves >= 5  # it does grow, by a bounded factor
    assert layer.allocated_bytes() <= (GROWTH * total + 3 * (MIN_SLACK + 1)) * 2 * D * 4


def test_appends_of_several_tokens_and_mixed_sizes_stay_exact():
    ref = Reference([3, 9])
    layer, pos = ref.layer(), 50
    for q in [1, 4, 17, 1, 1, 64, 2, 100, 1]:
        layer.append(*ref.new(q, pos))
        pos += q
        assert_holds(layer, ref)


def test_from_dense_never_writes_into_the_callers_tensors():
    k, v = torch.randn(2, 6, D), torch.randn(2, 6, D)
    k0, v0 = k.clone(), v.clone()
    layer = LayerKV.from_dense(k, v, torch.arange(6))
    layer.truncate(torch.tensor([4, 4]))
    layer.append(torch.ones(2, 2, D), torch.ones(2, 2, D), torch.tensor([6, 7]))
    assert torch.equal(k, k0) and torch.equal(v, v0)
    assert torch.equal(layer.dense()[0][:, 4:], torch.ones(2, 2, D))


# -- views -----------------------------------------------------------------------------------------------------------
def test_views_alias_the_buffer_and_in_place_appends_keep_it():
    ref = Reference([4, 4])
    layer = ref.layer()
    layer.append(*ref.new(1, 4))  # the first append reallocates with slack
    buf, values, _, _ = layer.storage()
    assert layer.allocated_bytes() > layer.nbytes()
    for _ in range(3):
        layer.append(*ref.new(1, 10))
        assert layer.storage()[0] is buf  # written in place
    dk, dv = layer.dense()
    assert same_storage(dk, buf) and same_storage(dv, values) and dk.shape == (2, 8, D)
    for h in range(2):
        k, v, _ = layer.head(h)
        assert same_storage(k, buf) and same_storage(v, values) and k.is_contiguous()
    assert not same_storage(layer.keys, buf)  # the flat (T, d) keys of a layer with slack: a compact copy
    assert_holds(layer, ref)


def test_ragged_heads_are_contiguous_segments_with_their_own_slack():
    ref = Reference([2, 11, 5])
    layer = ref.layer()
    layer.append(*ref.new(3, 20))
    _, _, starts, lens = layer.storage()
    assert lens == [5, 14, 8] and starts[0] == 0
    ends = [s + n for s, n in zip(starts, lens, strict=True)]
    assert all(e < s for e, s in zip(ends, starts[1:], strict=False)), "every head has slack of its own"
    gaps = {s - e for e, s in zip(ends, starts[1:], strict=False)}
    assert len(gaps) == 1, "equal slack per head"
    for h in range(3):
        k, _, _ = layer.head(h)
        assert k.is_contiguous() and same_storage(k, layer.storage()[0])


class FreshAllocations(TorchDispatchMode):
    """The largest tensor any aten op allocates (outputs not sharing storage with an input), in elements."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("layout", ["uniform", "ragged"])
def test_decode_step_does_no_work_proportional_to_the_cache(layout):
    """An append with room and a decode attention allocate nothing of the cache's size (no cat, no padded copy)."""
    lens, d = ([600, 600] if layout == "uniform" else [900, 300]), 32
    ref = Reference(lens, d=d)
    layer = ref.layer()
    layer.append(*ref.new(1, 1000))  # reallocates once, with slack
    q = torch.randn(4, 1, d)
    for t, backend in enumerate(("sdpa", "eager")):
        new = ref.new(1, 1001 + t)
        with FreshAllocations() as seen:
            layer.append(*new)
            cached_attention(q, layer, d**-0.5, backend)
        # attention's own scores are (Hq, L) (eager); a copy of one head's keys alone would be 300 x 32
        assert seen.largest <= 4 * 610, (backend, seen.largest)
    assert_holds(layer, ref)


# -- select / truncate / clone / share / rollback ----------------------------------------------------------------------
def test_select_on_a_ragged_layer_with_slack_keeps_the_right_rows_and_releases_the_buffer():
    ref = Reference([40, 12, 25], seed=1)
    layer = ref.layer()
    layer.append(*ref.new(2, 40))
    old = layer.storage()[0]
    keep = [torch.tensor([41, 0, 5, 3]), torch.tensor([13]), torch.tensor([26, 1, 2, 0, 9, 8])]  # unsorted
    layer.select(keep)
    ref.select(keep)
    assert_holds(layer, ref)
    assert not same_storage(layer.storage()[0], old)
    kept = 4 + 1 + 6
    assert layer.allocated_bytes() <= (GROWTH * kept + 3 * (MIN_SLACK + 1)) * 2 * D * 4
    layer.append(*ref.new(1, 50))  # the slack after select takes appends in place
    assert_holds(layer, ref)


def test_select_to_equal_lengths_gives_a_dense_view():
    ref = Reference([9, 4])
    layer = ref.layer()
    keep = [torch.tensor([8, 1, 3]), torch.tensor([0, 2, 3])]
    layer.select(keep)
    ref.select(keep)
    assert layer.uniform
    assert_holds(layer, ref)
    assert same_storage(layer.dense()[0], layer.storage()[0])


def test_truncate_keeps_the_buffer_and_compacts_when_mostly_empty():
    ref = Reference([30, 20])
    layer = ref.layer()
    for t in range(10):
        layer.append(*ref.new(1, 30 + t))
    buf = layer.storage()[0]
    layer.truncate(torch.tensor([38, 28]))
    ref.truncate([38, 28])
    assert layer.storage()[0] is buf  # a rollback is metadata only
    layer.append(*ref.new(1, 99))  # and the rows it freed are reused in place
    assert layer.storage()[0] is buf
    assert_holds(layer, ref)
    layer.truncate(torch.tensor([2, 1]))
    ref.truncate([2, 1])
    assert layer.storage()[0] is not buf and layer.allocated_bytes() <= (3 * GROWTH + 2 * (MIN_SLACK + 1)) * 2 * D * 4
    assert_holds(layer, ref)
    with pytest.raises(ValueError, match="lengthen"):
        layer.truncate(torch.tensor([3, 1]))


def test_truncate_from_ragged_to_equal_lengths_gives_a_dense_view():
    ref = Reference([10, 6])
    layer = ref.layer()
    layer.append(*ref.new(2, 10))
    layer.truncate(torch.tensor([8, 8]))
    ref.truncate([8, 8])
    assert layer.uniform
    assert_holds(layer, ref)
    assert same_storage(layer.dense()[0], layer.storage()[0])


def test_clone_is_independent_and_tight():
    ref = Reference([6, 3])
    layer = ref.layer()
    layer.append(*ref.new(2, 6))
    twin = layer.clone()
    assert twin.allocated_bytes() == twin.nbytes() == layer.nbytes()
    layer.truncate(torch.tensor([1, 1]))
    layer.append(torch.zeros(2, 4, D), torch.zeros(2, 4, D), torch.arange(4))
    assert_holds(twin, ref)


def test_one_head_clone_does_not_alias():
    ref = Reference([5])
    layer = ref.layer()
    layer.append(*ref.new(1, 5))
    twin = layer.clone()
    layer.truncate(torch.tensor([2]))
    layer.append(torch.zeros(1, 3, D), torch.zeros(1, 3, D), torch.arange(3))
    assert_holds(twin, ref)


@pytest.mark.parametrize("layout", list(LENS))
def test_shared_forks_are_copy_on_write(layout):
    ref = Reference(LENS[layout])
    base = ref.layer()
    base.append(*ref.new(1, 40))  # slack: an in-place write would be seen by every sharer
    a, b = base.share(), base.share()
    assert a.storage()[0] is b.storage()[0]
    a.append(torch.ones(3, 2, D), torch.ones(3, 2, D), torch.tensor([50, 51]))
    b.truncate(b.lens - 1)
    b.append(-torch.ones(3, 1, D), -torch.ones(3, 1, D), torch.tensor([60]))
    assert_holds(base, ref)
    assert all(torch.equal(a.head(h)[0][-2:], torch.ones(2, D)) for h in range(3))
    assert all(torch.equal(b.head(h)[0][-1:], -torch.ones(1, D)) for h in range(3))
    assert all(torch.equal(a.head(h)[0][:-2], ref.k[h]) for h in range(3))


@pytest.mark.parametrize("copy", [False, True])
def test_store_rollback_on_ragged_layers_with_slack(copy):
    refs = [Reference([8, 3], seed=0), Reference([5, 5], seed=1)]
    store = KVStore(2, [r.layer() for r in refs])
    for r, layer in zip(refs, store.layers, strict=True):
        layer.append(*r.new(2, 8))  # slack
    expected = [[x.clone() for x in r.k] for r in refs]
    snap = store.snapshot(copy=copy)
    for step in range(4):
        for r, layer in zip(refs, store.layers, strict=True):
            layer.append(*r.new(1, 20 + step))
    if copy:  # an eviction after the snapshot, undone by the rollback
        store.layers[0].select([torch.tensor([0, 1]), torch.tensor([2])])
    store.rollback(snap)
    for r, layer, k in zip(refs, store.layers, expected, strict=True):
        r.truncate([len(x) for x in k])
        assert_holds(layer, r)


# -- bytes -----------------------------------------------------------------------------------------------------------
def test_bytes_count_kept_entries_and_capacity_separately():
    k = torch.randn(2, 10, 8, dtype=torch.bfloat16)
    layer = LayerKV.from_dense(k, k[..., :6].clone(), torch.arange(10))  # d_k = 8, d_v = 6
    assert layer.nbytes() == layer.allocated_bytes() == 20 * (8 + 6) * 2
    layer.append(k[:, :1], k[:, :1, :6], torch.tensor([10]))
    assert layer.nbytes() == 22 * (8 + 6) * 2
    rows = layer.storage()[0].shape[0]
    assert layer.allocated_bytes() == rows * (8 + 6) * 2 and rows == 2 * (11 + MIN_SLACK)
    store = KVStore(2, [layer, None])
    store.reset_peak()
    assert (store.peak_bytes, store.peak_allocated_bytes) == (layer.nbytes(), layer.allocated_bytes())
    assert store.allocated_bytes() == layer.allocated_bytes()
    layer.select([torch.tensor([0]), torch.tensor([1])])
    store.track_peak()
    assert store.nbytes() == 2 * (8 + 6) * 2 and store.peak_bytes == 22 * (8 + 6) * 2
    assert store.allocated_bytes() == 2 * (1 + MIN_SLACK) * (8 + 6) * 2


# -- attention over layers with slack --------------------------------------------------------------------------------
def per_head_reference(q: Tensor, layer: LayerKV, scale: float) -> Tensor:
    """fp64, each query head over its own KV head's entries, bottom-right causal. q (Hq, q, d) -> (q, Hq, d)."""
    hq, q_len, _ = q.shape
    g = hq // layer.n_heads
    out = torch.zeros(q_len, hq, D, dtype=torch.float64)
    for i in range(hq):
        k, v, _ = layer.head(i // g)
        for t in range(q_len):
            limit = k.shape[0] - q_len + t + 1
            out[t, i] = ((k[:limit].double() @ q[i, t].double()) * scale).softmax(0) @ v[:limit].double()
    return out.float()


def slack_layer(lens: list[int], q_len: int) -> LayerKV:
    ref = Reference(lens, seed=2)
    layer = ref.layer()
    layer.append(*ref.new(2, 100))  # reallocates: slack between heads
    layer.append(*ref.new(q_len, 102))  # the step's own tokens, written in place
    assert layer.allocated_bytes() > layer.nbytes()
    return layer


ATT_LENS = {"uniform": [6, 6], "ragged": [9, 2], "short_first": [1, 14]}


@pytest.mark.parametrize("layout", list(ATT_LENS))
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("backend", ["sdpa", "eager", "varlen"])
def test_attention_over_a_buffer_with_slack_matches_per_head_reference(layout, q_len, backend):
    """CPU/SDPA and eager as the engine runs them; ``varlen``: the flash_attn_varlen_func layout (gap sequences,
    decode folding) through a CPU reference that also refuses what flash-attn refuses."""
    layer = slack_layer(ATT_LENS[layout], q_len)
    q = torch.randn(4, q_len, D, generator=torch.Generator().manual_seed(9)) * 2  # Hq = 4, Hkv = 2
    scale = D**-0.5
    if backend == "varlen":
        out = varlen_attention(q, layer, scale, varlen_reference)
    else:
        out = cached_attention(q, layer, scale, backend)
    assert out.shape == (q_len, 4, D)
    torch.testing.assert_close(out, per_head_reference(q, layer, scale), atol=1e-5, rtol=1e-5)


def test_varlen_reference_refuses_the_gqa_decode_packing_flash_attn_misreads():
    """flash-attn 2 swaps query heads into rows when max_seqlen_q = 1 with GQA, assuming one query per sequence;
    an empty (gap) sequence then breaks it (flash-attention#1537): the layout must not rely on it."""
    q, k = torch.randn(2, 2, D), torch.randn(10, 1, D)  # 2 query heads per KV head, 2 data sequences
    cu_q, cu_k = torch.tensor([0, 1, 1, 2], dtype=torch.int32), torch.tensor([0, 3, 6, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="1537"):
        varlen_reference(q, k, k, cu_q, cu_k, 1, 3, softmax_scale=1.0, causal=True)


# -- the decode benchmark script ---------------------------------------------------------------------------------------
def test_decode_bench_script_prints_both_clocks_and_agrees_with_static_cache():
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "scripts/decode_bench.py", "--contexts", "32,64", "--repeats", "1",
                          "--new-tokens", "3", "--layers", "1"], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "wall time per decoded token" in out and "cpu time per decoded token" in out
    assert "kvbench / static at 64" in out and "kvbench growth / static growth" in out
    assert "same greedy tokens as static: kvbench True, dynamic True" in out

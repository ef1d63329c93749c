"""Task-KV: the semantic head split and the kept sets on hand-made attention, then every architecture in the engine."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, HEAD_DIM, N_KV_HEADS, N_LAYERS, load_method, method_config
from torch import nn

from kvbench.budget import tokens_per_head
from kvbench.engine import Engine
from kvbench.engine.context import LayerContext
from kvbench.engine.engine import select_tokens
from kvbench.errors import UsageError
from methods.taskkv import TaskKV, TaskKVAllocator, fit_heterogeneous, semantic_distance, sparsify

# ---------------------------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------------------------


def test_sparsify_keeps_the_top_t_entries():
    v = torch.tensor([[0.1, 0.5, 0.2, 0.7], [0.4, 0.3, 0.2, 0.1]])
    assert torch.equal(sparsify(v, 2), torch.tensor([[0.0, 0.5, 0.0, 0.7], [0.4, 0.3, 0.0, 0.0]]))
    assert torch.equal(sparsify(v, 0), v) and torch.equal(sparsify(v, 9), v)


def test_semantic_distance_by_hand():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # centre (0.25, 0.75)
    assert torch.allclose(semantic_distance(v, "l2"), torch.tensor([0.75 * 2**0.5] + [0.25 * 2**0.5] * 3))
    cos = torch.tensor([0.25, 0.75, 0.75, 0.75]) / (0.25**2 + 0.75**2) ** 0.5
    assert torch.allclose(semantic_distance(v, "cosine"), 1 - cos)
    with pytest.raises(UsageError, match="distance"):
        semantic_distance(v, "manhattan")


@pytest.mark.parametrize(("h", "cand", "keep", "base", "expected"), [
    (4, 56, 23, 12, 1),  # 56 + 3 * 12 = 92 = 4 * 23: exactly one full head
    (4, 56, 22, 12, 0),  # one token short
    (4, 56, 42, 12, 2),  # 2 * 56 + 2 * 12 = 136 <= 168 < 3 * 56 + 12
    (4, 56, 56, 12, 4),  # everything fits
    (2, 168, 102, 36, 1),
    (2, 168, 0, 0, 0),
])
def test_fit_heterogeneous(h, cand, keep, base, expected):
    assert fit_heterogeneous(h, cand, keep, base) == expected
    k = expected
    assert k * cand + (h - k) * base <= h * keep
    assert k == h or (k + 1) * cand + (h - k - 1) * base > h * keep


# ---------------------------------------------------------------------------------------------------------------
# a hand-made layer: KV head 0's window queries concentrate on a distinctive middle span, the others on the sink
# ---------------------------------------------------------------------------------------------------------------
N, W, S, M, H, D = 64, 8, 4, 8, 4, 8
SPAN = range(20, 28)


def layer(keep: int, groups: int = 1, seed: int = 0) -> tuple[LayerContext, torch.Tensor]:
    """Keys: token 0 is a sink (direction e1) for every head, middle token j of head h has c[h, j] * e1 (distinct
    random c in [0, 0.5)), head 0's span tokens also e0. Window queries: 10 e0 for head 0 (all its G query heads, or
    only the first when ``groups`` > 1 and the second is sink-like), 6 e1 for the others."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(H, N, generator=g) * 0.5  # (H, n)
    keys = torch.zeros(H, N, D)
    keys[:, S : N - W, 1] = c[:, S : N - W]
    keys[:, 0, 1] = 1.0
    keys[0, SPAN.start : SPAN.stop, 0] = 1.0
    queries = torch.zeros(H * groups, N, D)
    queries[:, :, 1] = 6.0
    queries[0, :, :] = 0.0
    queries[0, :, 0] = 10.0
    ctx = LayerContext(layer_idx=0, n_layers=1, module=nn.Identity(), queries=queries, keys=keys,
                       values=keys.clone(), positions=torch.arange(N), window=W, keep=keep, scaling=1.0)
    return ctx, c


def kept(ctx: LayerContext, method: TaskKV, allocator: TaskKVAllocator) -> list[list[int]]:
    return [sorted(idx.tolist()) for idx in select_tokens(method.score(ctx), ctx, allocator)]


def sinks_recent_middle(c_row: torch.Tensor, m: int) -> list[int]:
    middle = (c_row[S : N - W].argsort(descending=True)[:m] + S).tolist()
    return sorted([*range(S), *middle, *range(N - W, N)])


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("top_t", [64, 8])
def test_one_full_head_when_the_budget_fits_exactly_one(distance, top_t):
    method = TaskKV(window=W, n_sink=S, n_middle=M, top_t=top_t, distance=distance)
    allocator = TaskKVAllocator()
    ctx, c = layer(keep=31)  # candidates 56, per-head candidate budget 23: 56 + 3 * (4 + 8) = 92 = 4 * 23
    sets = kept(ctx, method, allocator)
    dist = ctx.memo["taskkv"]["distance"]
    assert int(dist.argmax()) == 0 and (dist[0] > 2 * dist[1:]).all(), dist
    assert ctx.memo["taskkv"]["heterogeneous"].tolist() == [True, False, False, False]
    assert allocator.heterogeneous == {0: [0]}
    assert sets[0] == list(range(N)), "the heterogeneous head keeps everything"
    for h in range(1, H):
        assert sets[h] == sinks_recent_middle(c[h], M), f"head {h}: first s + last r + top-m middle"
    assert sum(map(len, sets)) == H * 31


def test_one_token_less_and_no_full_head_fits():
    ctx, c = layer(keep=30)
    sets = kept(ctx, TaskKV(window=W, n_sink=S, n_middle=M), TaskKVAllocator())
    assert ctx.memo["taskkv"]["heterogeneous"].tolist() == [False] * H
    assert [len(x) for x in sets] == [30] * H, "leftover goes to the middle activations: 4 + 18 + 8"
    assert set(SPAN) <= set(sets[0]), "head 0's middle activations are its span"
    for h in range(1, H):
        assert sets[h] == sinks_recent_middle(c[h], 18)
    sets = kept(layer(keep=30)[0], TaskKV(window=W, n_sink=S, n_middle=M), TaskKVAllocator(redistribute=False))
    assert [len(x) for x in sets] == [S + M + W] * H, "without redistribution: exactly s + m + r"


def test_threshold_mode_flags_only_the_outlier():
    ctx, c = layer(keep=50)  # budget mode affords 2 full heads (2 * 56 + 2 * 12 <= 4 * 42)
    sets = kept(ctx, TaskKV(window=W, n_sink=S, n_middle=M), TaskKVAllocator())
    assert [len(x) for x in sets].count(N) == 2 and len(sets[0]) == N
    ctx, c = layer(keep=50)
    sets = kept(ctx, TaskKV(window=W, n_sink=S, n_middle=M), TaskKVAllocator(count="threshold", lam=1.0))
    assert ctx.memo["taskkv"]["heterogeneous"].tolist() == [True, False, False, False]
    assert len(sets[0]) == N and sum(map(len, sets)) == H * 50
    assert sorted(len(x) for x in sets[1:]) == [37 + W, 37 + W, 38 + W], "76 leftover over 3 heads: 25, 25, 26"
    ctx, _ = layer(keep=50)
    kept(ctx, TaskKV(window=W, n_sink=S, n_middle=M), TaskKVAllocator(count="threshold", lam=10.0))
    assert not ctx.memo["taskkv"]["heterogeneous"].any()


@pytest.mark.parametrize("gqa", ["max", "mean"])
def test_gqa_distance_is_reduced_over_the_query_group(gqa):
    ctx, _ = layer(keep=31, groups=2)  # KV head 0: query head 0 on the span, query head 1 on the sink
    TaskKV(window=W, n_sink=S, n_middle=M, gqa=gqa).score(ctx)
    dq = ctx.memo["taskkv"]["distance_query_heads"]
    assert dq.shape == (2 * H,) and int(dq.argmax()) == 0
    reduce = dq.view(H, 2).amax(1) if gqa == "max" else dq.view(H, 2).mean(1)
    assert torch.equal(ctx.memo["taskkv"]["distance"], reduce)


def test_tiny_budget_keeps_recent_then_sinks_then_middle():
    ctx, c = layer(keep=10)  # engine window min(8, 10) = 8, candidates budget 2 < s: only two sinks
    ctx.window = 8
    sets = kept(ctx, TaskKV(window=W, n_sink=S, n_middle=M), TaskKVAllocator())
    assert all(x == [0, 1, *range(N - W, N)] for x in sets)


def test_bad_parameters_and_a_foreign_method_get_one_clear_error():
    with pytest.raises(UsageError, match="count"):
        TaskKVAllocator(count="auto")
    for bad in ({"distance": "dot"}, {"gqa": "median"}, {"window": 0}, {"n_middle": -1}, {"pooling": "min"}):
        with pytest.raises(UsageError):
            TaskKV(**bad)
    ctx, _ = layer(keep=31)
    with pytest.raises(UsageError, match="method=taskkv"):
        TaskKVAllocator().allocate(torch.rand(H, N - W), 23, 0, 1, ctx=ctx)


def test_runner_refuses_a_foreign_method_before_claiming_a_run_dir(tmp_path):
    from kvbench.runner import run

    cfg = method_config("snapkv", ("allocator=taskkv", f"paths.results={tmp_path}", "progress=false"))
    with pytest.raises(UsageError, match="needs method=taskkv"):
        run(cfg)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# the engine, every architecture
# ---------------------------------------------------------------------------------------------------------------
NE = 200
ENGINE_BUDGETS = (134, 0.5, 0.3, 0.1, 16)  # 134: exactly one of the two KV heads fits in full (168 + 36 = 2 * 102)


def prefill(model, budget, overrides=()):
    method, allocator = load_method("taskkv", tuple(overrides))
    scores: dict[int, torch.Tensor] = {}
    score = method.score

    def recording(ctx):
        scores[ctx.layer_idx] = out = score(ctx)
        return out

    method.score = recording
    ids = torch.randint(0, 128, (NE,), generator=torch.Generator().manual_seed(3))
    with Engine(model, method, allocator, budget=budget) as eng:
        eng.reset()
        logits = eng.forward(ids, compress=True)
        layers = [(ly.lens.clone(), [ly.head(h)[2].tolist() for h in range(ly.n_heads)]) for ly in eng.store.layers]
        nbytes = eng.store.nbytes()
        logits2 = eng.forward([int(logits.argmax())])
    return method, allocator, layers, nbytes, scores, (logits, logits2)


@pytest.mark.parametrize("budget", ENGINE_BUDGETS)
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_counts_bytes_and_split(tiny_model, arch, budget):
    method, allocator, layers, nbytes, scores, _ = prefill(tiny_model(arch), budget)
    keep = tokens_per_head(budget, NE)
    window = min(method.window, keep)
    assert nbytes == N_LAYERS * N_KV_HEADS * keep * HEAD_DIM * 4 * 2, "KV bytes = exactly the budget"
    for i, (lens, positions) in enumerate(layers):
        lens = lens.tolist()
        assert sum(lens) == N_KV_HEADS * keep
        full = [h for h in range(N_KV_HEADS) if lens[h] == NE]
        assert full == allocator.heterogeneous[i]
        assert len(full) == (1 if budget == 134 else 0)
        for h in range(N_KV_HEADS):
            pos = positions[h]
            assert pos[len(pos) - window:] == list(range(NE - window, NE)), "recent tokens kept"
            if h in full:
                continue
            sinks = min(method.n_sink, keep - window)
            assert pos[:sinks] == list(range(sinks)), "sinks kept"
            n_mid = lens[h] - window - sinks
            middle = scores[i][h, method.n_sink:].float().argsort(descending=True, stable=True)[:n_mid]
            assert pos[sinks : len(pos) - window] == sorted((middle + method.n_sink).tolist()), "top middle"
    if budget == 134:
        assert all(sorted(lens.tolist()) == [4 + 32 + 32, NE] for lens, _ in layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_budget_one_is_bit_identical_to_fullkv(tiny_model, arch):
    ids = torch.randint(0, 128, (NE,), generator=torch.Generator().manual_seed(3))
    with Engine(tiny_model(arch), *load_method("fullkv"), budget=1.0) as eng:
        eng.reset()
        ref = eng.forward(ids, compress=True)
        ref2 = eng.forward([int(ref.argmax())])
    *_, (logits, logits2) = prefill(tiny_model(arch), 1.0)
    assert torch.equal(logits, ref) and torch.equal(logits2, ref2)


def test_query_head_cache_splits_query_heads(tiny_model):
    """cache=query_head: 4 caches per layer; at 134 tokens per head two of the four fit in full (2 * 168 + 2 * 36
    = 4 * 102), the G x memory shows in the bytes."""
    _, allocator, layers, nbytes, _, _ = prefill(tiny_model("llama"), 134, ("method.cache=query_head",))
    assert all(sorted(lens.tolist()) == [68, 68, NE, NE] for lens, _ in layers)
    assert all(len(allocator.heterogeneous[i]) == 2 for i in range(N_LAYERS))
    assert nbytes == N_LAYERS * 4 * 134 * HEAD_DIM * 4 * 2

"""Scoring on hand-made tensors with known answers, through a ``LayerContext`` built directly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from kvbench.budget import HeadAdaptive, Uniform
from kvbench.engine import LayerContext, select_tokens
from methods.defensivekv import DefensiveKV
from methods.h2o import H2O
from methods.snapkv import SnapKV
from methods.streamingllm import StreamingLLM

HQ, HKV, G = 4, 2, 2


def make_module(d: int, weight: Tensor | None = None, hidden: int = 12) -> nn.Module:
    module = nn.Module()
    module.o_proj = nn.Linear(HQ * d, hidden if weight is None else weight.shape[0], bias=False)
    if weight is not None:
        with torch.no_grad():
            module.o_proj.weight.copy_(weight)
    return module


def make_ctx(queries: Tensor, keys: Tensor, values: Tensor | None = None, window: int = 4, keep: int | None = None,
             module: nn.Module | None = None, layer_idx: int = 0) -> LayerContext:
    n, d = keys.shape[1], keys.shape[2]
    values = torch.randn(keys.shape, generator=torch.Generator().manual_seed(99)) if values is None else values
    return LayerContext(
        layer_idx=layer_idx, n_layers=2, module=module if module is not None else make_module(d),
        queries=queries, keys=keys, values=values, positions=torch.arange(n), window=window,
        keep=n // 2 if keep is None else keep, scaling=d**-0.5,
    )


def random_qk(n: int, d: int = 8, seed: int = 0, scale: float = 1.5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(HQ, n, d, generator=g) * scale, torch.randn(HKV, n, d, generator=g) * scale


def ref_window_probs(q: Tensor, k: Tensor, w: int, scale: float) -> Tensor:
    """(HQ, w, n) probabilities of the last w queries (positions n-w+t) over all n keys, causal, fp64."""
    n = k.shape[1]
    out = torch.zeros(q.shape[0], w, n, dtype=torch.float64)
    for i in range(q.shape[0]):
        for t in range(w):
            pos = n - w + t
            logits = k[i // G, : pos + 1].double() @ q[i, q.shape[1] - w + t].double() * scale
            out[i, t, : pos + 1] = logits.softmax(0)
    return out


def ref_pool(x: Tensor, kernel: int, mode: str) -> Tensor:
    """Stride-1 pooling along the last axis with padding kernel//2 (avg: zero pad, divided by kernel)."""
    m, r = x.shape[-1], kernel // 2
    out = torch.empty_like(x)
    for j in range(m):
        seg = x[..., max(0, j - r): j + r + 1]
        out[..., j] = seg.amax(-1) if mode == "max" else seg.sum(-1) / kernel
    return out


# ---------------------------------------------------------------------------------------------------------------
# window attention
# ---------------------------------------------------------------------------------------------------------------
def test_window_attention_probabilities_shape_and_causality():
    n, w = 12, 4
    q, k = random_qk(n)
    ctx = make_ctx(q, k, window=w)
    attn = ctx.window_attention()
    assert attn.shape == (HQ, w, n - w)
    ref = ref_window_probs(q, k, w, ctx.scaling)
    torch.testing.assert_close(attn.double(), ref[:, :, : n - w], atol=1e-6, rtol=1e-5)
    # over all n keys every row sums to 1; over the non-window keys strictly less
    total = attn.double().sum(-1) + ref[:, :, n - w:].sum(-1)
    torch.testing.assert_close(total, torch.ones(HQ, w, dtype=torch.float64))
    assert (attn.sum(-1) < 1).all()
    # causal inside the window: only the last window query sees the last key
    k2 = k.clone()
    k2[:, -1] = 25.0 * q[:, -1].reshape(HKV, G, -1)[:, 0]
    attn2 = make_ctx(q, k2, window=w).window_attention()
    torch.testing.assert_close(attn2[:, : w - 1], attn[:, : w - 1], atol=1e-7, rtol=0)
    assert (attn2[:, w - 1] - attn[:, w - 1]).abs().max() > 1e-3
    # memoised, and another window size on request
    assert ctx.window_attention() is attn
    assert ctx.window_attention(2).shape == (HQ, 2, n - 2)
    torch.testing.assert_close(ctx.window_attention(2).double(), ref_window_probs(q, k, 2, ctx.scaling)[:, :, : n - 2],
                               atol=1e-6, rtol=1e-5)


def test_window_attention_is_cast_back_to_the_model_dtype():
    q, k = random_qk(10)
    attn = make_ctx(q.to(torch.bfloat16), k.to(torch.bfloat16), values=k.to(torch.bfloat16)).window_attention()
    assert attn.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------
# SnapKV
# ---------------------------------------------------------------------------------------------------------------
def spiked_qk(n: int = 40, d: int = 8, spikes: dict[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Small random q/k; for each (query head i -> key j) in ``spikes``, every window query of head i is u_i and
    KV head i // G's key j is 30 u_i, so head i puts nearly all its window attention on key j."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(HQ, n, d, generator=g) * 0.1, torch.randn(HKV, n, d, generator=g) * 0.1
    for i, j in (spikes or {}).items():
        u = torch.zeros(d)
        u[i] = 1.0
        q[i] = u
        k[i // G, j] = 30 * u
    return q, k


def test_snapkv_spike_is_top_and_pooled_to_neighbours():
    q, k = spiked_qk(spikes={1: 15, 2: 24})  # query head 1 -> KV head 0, query head 2 -> KV head 1
    ctx = make_ctx(q, k, window=4)
    raw = SnapKV(window=4, pooling="none").score(ctx)
    assert raw.shape == (HKV, 36)
    assert int(raw[0].argmax()) == 15 and int(raw[1].argmax()) == 24  # GQA: query head i belongs to KV head i // G
    pooled = SnapKV(window=4, kernel=7, pooling="max").score(ctx)
    for h, j in ((0, 15), (1, 24)):
        assert (pooled[h, j - 3: j + 4] == raw[h, j]).all(), "max-pool spreads the spike to +-kernel//2"
        assert pooled[h, j - 4] < raw[h, j] and pooled[h, j + 4] < raw[h, j]


@pytest.mark.parametrize("gqa", ["mean", "max"])
@pytest.mark.parametrize(("pooling", "kernel"), [("max", 7), ("avg", 5), ("none", 1)])
def test_snapkv_matches_reference(pooling, kernel, gqa):
    n, w = 30, 6
    q, k = random_qk(n, seed=2)
    ctx = make_ctx(q, k, window=w)
    a = ref_window_probs(q, k, w, ctx.scaling)[:, :, : n - w].mean(1)  # (HQ, n - w)
    grouped = a.reshape(HKV, G, n - w)
    s = grouped.mean(1) if gqa == "mean" else grouped.amax(1)  # combined before pooling
    ref = ref_pool(s, kernel, pooling) if pooling != "none" else s
    out = SnapKV(window=w, kernel=kernel, pooling=pooling, gqa=gqa).score(ctx)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)
    summed = SnapKV(window=w, kernel=kernel, pooling=pooling, gqa=gqa, reduce="sum").score(ctx)
    torch.testing.assert_close(summed, out * w, atol=1e-6, rtol=1e-5)


def test_snapkv_selection_keeps_window_and_top_tokens():
    q, k = spiked_qk(spikes={0: 10, 3: 30})
    ctx = make_ctx(q, k, window=4, keep=5)  # 1 candidate per head + the window
    kept = select_tokens(SnapKV(window=4, pooling="none").score(ctx), ctx, Uniform())
    assert sorted(kept[0].tolist()) == [10, 36, 37, 38, 39]
    assert sorted(kept[1].tolist()) == [30, 36, 37, 38, 39]


def test_select_tokens_rejects_wrong_shapes_and_accepts_full_length_scores():
    q, k = random_qk(20)
    ctx = make_ctx(q, k, window=4, keep=6)
    with pytest.raises(ValueError, match="score"):
        select_tokens(torch.zeros(HKV, 10), ctx, Uniform())
    with pytest.raises(ValueError, match="score"):
        select_tokens(torch.zeros(HQ, 16), ctx, Uniform())
    scores = torch.arange(20.0).flip(0).expand(HKV, 20)  # (H, n): window tokens compete, the first 6 win
    assert [sorted(x.tolist()) for x in select_tokens(scores, ctx, Uniform())] == [list(range(6))] * HKV


# ---------------------------------------------------------------------------------------------------------------
# H2O
# ---------------------------------------------------------------------------------------------------------------
def ref_column_sums(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Sum over all queries (the last q positions of the cache) of causal attention: (HQ, n), fp64."""
    n, nq = k.shape[1], q.shape[1]
    out = torch.zeros(q.shape[0], n, dtype=torch.float64)
    for i in range(q.shape[0]):
        for r in range(nq):
            pos = n - nq + r
            out[i, : pos + 1] += (k[i // G, : pos + 1].double() @ q[i, r].double() * scale).softmax(0)
    return out


@pytest.mark.parametrize("n_queries", [24, 9])
def test_h2o_column_sums_match_reference(n_queries):
    n, w = 24, 3
    q, k = random_qk(n, seed=4)
    q = q[:, n - n_queries:]  # fewer queries than keys: they sit at the last positions
    ctx = make_ctx(q, k, window=w)
    ref = ref_column_sums(q, k, ctx.scaling)
    colsum = ctx.attention_column_sums()
    torch.testing.assert_close(colsum.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(colsum.sum(-1), torch.full((HQ,), float(n_queries)), atol=1e-4, rtol=0)
    chunked = make_ctx(q, k, window=w).attention_column_sums(max_elements=4 * HQ * n)  # query chunks of 4
    torch.testing.assert_close(chunked, colsum, atol=1e-6, rtol=0)
    score = H2O(window=w).score(ctx)
    assert score.shape == (HKV, n - w)
    torch.testing.assert_close(score.double(), ref[:, : n - w].reshape(HKV, G, -1).mean(1), atol=1e-5, rtol=1e-5)


def test_h2o_is_fully_causal():
    """A key that every query would attend to gets nothing from the queries before it."""
    n, j = 20, 7
    g = torch.Generator().manual_seed(0)
    u = torch.zeros(8)
    u[0] = 1.0
    q = u.expand(HQ, n, 8).clone()
    k = torch.randn(HKV, n, 8, generator=g) * 0.05
    k[:, j] = 40 * u
    colsum = make_ctx(q, k, window=2).attention_column_sums()
    # queries j..n-1 put ~1 on key j; queries 0..j-1 cannot see it (the legacy KVF bug would give ~n)
    assert (colsum[:, j] <= n - j + 1e-4).all()
    assert (colsum[:, j] >= (n - j) * 0.99).all()
    assert (colsum[:, :j].sum(-1) >= j - 1e-3).all()  # the earlier rows spread their whole mass over earlier keys


# ---------------------------------------------------------------------------------------------------------------
# StreamingLLM
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n_sink", "keep"), [(4, 12), (4, 5), (0, 7), (2, 30)])
def test_streamingllm_keeps_sinks_and_recent(n_sink, keep):
    n = 50
    q, k = random_qk(n)
    ctx = make_ctx(q, k, window=0, keep=keep)
    kept = select_tokens(StreamingLLM(n_sink=n_sink).score(ctx), ctx, Uniform())
    expected = list(range(n_sink)) + list(range(n - (keep - n_sink), n))
    assert [sorted(x.tolist()) for x in kept] == [expected] * HKV


# ---------------------------------------------------------------------------------------------------------------
# DefensiveKV (methods_core §5.1), against a plain re-implementation written from the note
# ---------------------------------------------------------------------------------------------------------------
def defensive_reference(attn: Tensor, values: Tensor, o_weight: Tensor, n: int, w: int, keep: int,
                        kernel: int = 5, tau: float = 0.9) -> Tensor:
    """attn (HQ, w, n - w) window attention, values (HKV, n, d), o_weight (hidden, HQ * d) -> S (HKV, n - w)."""
    attn = attn.double()
    hkv, d, m = values.shape[0], values.shape[-1], n - w
    a = attn.reshape(hkv, G, w, m)  # [h, g, i, j]
    ave = a.mean((1, 2))  # 2. ave[h, j] = mean_{g,i} A
    base = a.sum(-1, keepdim=True)  # base[h, g, i] = sum_j A
    p = ref_pool(a, kernel, "avg")  # 3. per row avgpool, renormalised to keep the row mass
    p = p / p.sum(-1, keepdim=True) * base
    mx = torch.full((hkv, m), -math.inf, dtype=torch.float64)  # 4. M = max over g and i
    for h in range(hkv):
        for gg in range(G):
            for i in range(w):
                mx[h] = torch.maximum(mx[h], p[h, gg, i])
    dd = torch.maximum(mx, mx.mean(-1, keepdim=True))  # D = max(M, mean_j M)
    wt = o_weight.double().T  # (HQ * d, hidden); W_O^(q) = rows q*d:(q+1)*d
    norms = torch.zeros(hkv, n, dtype=torch.float64)  # 5. N[h, j] = mean_g |v W_O^(h,g)|_1
    for h in range(hkv):
        for j in range(n):
            norms[h, j] = sum((values[h, j].double() @ wt[(h * G + gg) * d: (h * G + gg + 1) * d]).abs().sum()
                              for gg in range(G)) / G
    norms = norms[:, :m]
    s = dd * norms / norms.sum(0, keepdim=True)  # normalised across KV heads per token
    bias = attn[:, :, max(0, n - 2 * w): m].sum(-1).mean()  # 6. window_bias over (h, g, i)
    thr = tau - bias
    out = s.clone()
    top = s.max()
    limit = max(0, int((n - w) * keep / n - w))
    for h in range(hkv):
        r = ave[h] / ave[h].sum()
        order = sorted(range(m), key=lambda j, r=r: -float(r[j]))
        c, acc = 0, 0.0
        for idx, j in enumerate(order):
            acc += float(r[j])
            if acc >= thr:
                c = idx
                break
        for j in order[: min(c, limit)]:
            out[h, j] = top
    return out


def identity_module(d: int) -> nn.Module:
    """o_proj = identity, so N[h, j] = |v_{h,j}|_1."""
    return make_module(d, weight=torch.eye(HQ * d))


def with_attention(ctx: LayerContext, attn: Tensor) -> LayerContext:
    ctx.window_attention = lambda w=None: attn  # hand-made window attention
    return ctx


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("n", "w", "keep"), [(40, 6, 20), (40, 6, 30), (24, 8, 12)])
def test_defensivekv_matches_reference_on_random_tensors(seed, n, w, keep):
    d = 4
    q, k = random_qk(n, d=d, seed=seed, scale=2.0)
    values = torch.randn(HKV, n, d, generator=torch.Generator().manual_seed(seed + 10))
    module = make_module(d, hidden=10)
    ctx = make_ctx(q, k, values=values, window=w, keep=keep, module=module)
    method = DefensiveKV(window=w, norm_chunk=7)  # chunking must not matter
    out = method.score(ctx)
    assert out.shape == (HKV, n - w)
    attn = ref_window_probs(q, k, w, ctx.scaling)[:, :, : n - w]
    ref = defensive_reference(attn, values, module.o_proj.weight.detach(), n, w, keep)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)


def test_defensivekv_max_aggregation_beats_the_mean():
    """Key a gets 0.9 from a single (group member, window query); key b gets 0.3 from all the others."""
    n, w, d, a, b = 24, 4, 4, 5, 14
    attn = torch.full((HQ, w, n - w), 1e-3)
    attn[:2, :, b] = 0.3  # both query heads of KV head 0
    attn[1, 2, b] = 1e-3
    attn[1, 2, a] = 0.9  # query head 1 = (KV head 0, g = 1), window query 2
    values = torch.ones(HKV, n, d)
    ctx = with_attention(make_ctx(*random_qk(n, d=d), values=values, window=w, module=identity_module(d)), attn)
    out = DefensiveKV(window=w, tau=0.0).score(ctx)  # tau 0: no stage-1 forcing
    mean = attn.reshape(HKV, G, w, -1).mean((1, 2))
    assert mean[0, b] > mean[0, a], "the mean prefers b"
    assert int(out[0].argmax()) in range(a - 2, a + 3) and out[0, a] > out[0, b], "the worst case prefers a"
    ref = defensive_reference(attn, values, torch.eye(HQ * d), n, w, ctx.keep, tau=0.0)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)
    # D is floored at the head's mean of M: far from a and b every score is the same floor value
    assert torch.allclose(out[0, 9], out[0, 10]) and torch.allclose(out[0, 19], out[0, 18])


def test_defensivekv_value_norms_are_normalised_across_heads():
    n, w, d, a, b = 24, 4, 4, 8, 12
    attn = torch.full((HQ, w, n - w), 0.02)  # flat attention: D is the same for a and b
    values = torch.full((HKV, n, d), 0.25)  # |v|_1 = 1 everywhere ...
    values[0, a], values[1, a] = 0.5, 0.5  # ... except: token a has norms (2, 2) -> shares (0.5, 0.5)
    values[0, b], values[1, b] = 0.75, 2.25  # token b has norms (3, 9) -> shares (0.25, 0.75)
    ctx = with_attention(make_ctx(*random_qk(n, d=d), values=values, window=w, module=identity_module(d)), attn)
    out = DefensiveKV(window=w, tau=0.0).score(ctx)
    assert out[0, a] > out[0, b], "head 0: b has the larger raw norm but the smaller share across heads"
    assert out[1, b] > out[1, a]
    torch.testing.assert_close(out[0, a] / out[0, b], torch.tensor(2.0))
    torch.testing.assert_close(out[0, a] / out[0, 7], torch.tensor(1.0))


@pytest.mark.parametrize(("keep", "forced_head1"), [(12, 6), (8, 2), (5, 0)])
def test_defensivekv_stage1_forcing(keep, forced_head1):
    """Head 0's ave has mass (0.5, 0.3, 0.15, ...) on c1, c2, c3: cumsum reaches 0.9 at index 2, so c1 and c2 get
    max(S) (one short of tau). Head 1's mass is spread, so its count is clamped to int((n-w) keep / n - w)."""
    n, w, d = 24, 4, 4
    m = n - w
    c1, c2, c3 = 2, 9, 11
    attn = torch.zeros(HQ, w, m)
    attn[:2] = 0.05 / (m - 3)
    attn[:2, :, c1], attn[:2, :, c2], attn[:2, :, c3] = 0.5, 0.3, 0.15
    attn[2:] = torch.linspace(0.2, 0.1, m) / 3  # distinct, decreasing: the top tokens of head 1 are 0, 1, 2, ...
    values = torch.full((HKV, n, d), 0.25)
    values[0, [c1, c2]] = 1e-3  # tiny value norms: without forcing they would rank last
    values[1, :6] = 1e-3
    ctx = with_attention(make_ctx(*random_qk(n, d=d), values=values, window=w, keep=keep,
                                  module=identity_module(d)), attn)
    out = DefensiveKV(window=w).score(ctx)
    ref = defensive_reference(attn, values, torch.eye(HQ * d), n, w, keep)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)
    top = out.max()
    limit = max(0, int((n - w) * keep / n - w))
    forced0 = [c1, c2][: min(2, limit)]
    assert all(out[0, j] == top for j in forced0)
    assert all(out[0, j] < top for j in {c1, c2} - set(forced0))
    assert out[0, c3] < top, "c3 completes tau but is not forced (one short)"
    head1 = (out[1] == top).nonzero().flatten().tolist()
    assert head1[:forced_head1] == list(range(forced_head1)) and all(out[1, j] < top for j in range(forced_head1, 6))


def test_defensivekv_flat_topk_selection_is_ragged():
    """With the flat allocator (alpha 0) a head with all the high scores takes more of the layer's budget."""
    n, w, d = 30, 4, 4
    q, k = spiked_qk(n=n, d=d, spikes={0: 5, 1: 20})  # both spikes in KV head 0
    ctx = make_ctx(q, k, values=torch.ones(HKV, n, d), window=w, keep=12, module=identity_module(d))
    scores = DefensiveKV(window=w).score(ctx)
    kept = select_tokens(scores, ctx, HeadAdaptive(alpha=0.0))
    lens = [len(x) for x in kept]
    assert sum(lens) == HKV * 12
    assert lens[0] > lens[1]
    assert {3, 4, 5, 6, 7, 18, 19, 20, 21, 22} <= set(kept[0].tolist()), "the spikes and their pooled neighbours"
    for x in kept:
        assert set(range(n - w, n)) <= set(x.tolist())

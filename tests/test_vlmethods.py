"""GUI-KV (``method=guikv``, ``guikv_gqa``, ``guikv_svd``) and ZipVL (``method=zipvl``, ``zipvl_evict``) through the
Engine on a tiny random Llama whose prompt carries hand-set image spans (``image:0``, ``image:1``), and their
engine-facing pieces on hand-made tensors (the scoring kernels themselves: tests/test_vlm_kernels.py)."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import HEAD_DIM, N_HEADS, N_KV_HEADS, N_LAYERS, load_method

from kvbench.budget import Uniform, tokens_per_head
from kvbench.compat import IncompatibleError, check_compatible
from kvbench.engine import Engine
from kvbench.engine.attention import causal_attention
from kvbench.engine.context import LayerContext
from kvbench.engine.quant import EVICT, HIGH, LOW, QuantLayerKV, QuantSpec
from kvbench.errors import UsageError
from kvbench.pipeline import cache_stats
from methods.guikv import GUIKV
from methods.snapkv import SnapKV
from methods.zipvl import ZipVL

N = 200
G = N_HEADS // N_KV_HEADS
PREV, CUR = (20, 80), (100, 160)  # two screenshots of 60 tokens; text before, between and after
SPANS = {"context": (0, N), "image:0": PREV, "image:1": CUR}


def ids(seed: int = 0, n: int = N) -> torch.Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def run(model, name: str, budget: float, spans=SPANS, steps: int = 4, overrides: tuple[str, ...] = ()):
    """Compressed prefill of N tokens with ``spans``, then greedy decoding: (engine state after prefill, tokens)."""
    method, allocator = load_method(name, overrides)
    with Engine(model, method, allocator, budget=budget) as eng:
        eng.reset()
        eng.spans = dict(spans)
        logits = eng.forward(ids(), compress=True)
        kept = [[layer.head(h)[2].clone() for h in range(layer.n_heads)] for layer in eng.store.layers]
        state = {"kept": kept, "stats": cache_stats(eng, N), "layers": [ly.clone() for ly in eng.store.layers],
                 "layer_stats": dict(eng.layer_stats), "logits": logits}
        tokens, _ = eng.generate(logits, steps)
        state["lens_after"] = [layer.lens.clone() for layer in eng.store.layers]
    return state, tokens


def inside(pos: torch.Tensor, span: tuple[int, int]) -> int:
    return int(((pos >= span[0]) & (pos < span[1])).sum())


# -- GUI-KV ---------------------------------------------------------------------------------------------------------
def test_guikv_without_images_is_snapkv_with_the_authors_settings(tiny_model) -> None:
    """No image spans: window attention summed, average-pooled (5), per query head, as the authors' cluster."""
    model = tiny_model("llama")
    a, ta = run(model, "guikv", 0.2, spans={"context": (0, N)})
    with Engine(model, SnapKV(window=8, kernel=5, pooling="avg", reduce="sum", cache="query_head"), Uniform(),
                budget=0.2) as eng:
        eng.reset()
        logits = eng.forward(ids(), compress=True)
        ref = [[layer.head(h)[2] for h in range(layer.n_heads)] for layer in eng.store.layers]
        assert eng.generate(logits, 4)[0] == ta
    assert all(torch.equal(x, y) for la, lb in zip(a["kept"], ref, strict=True) for x, y in zip(la, lb, strict=True))


def test_guikv_keeps_the_current_screenshot_and_zeroes_redundant_earlier_tokens(tiny_model) -> None:
    model = tiny_model("llama")
    plain, _ = run(model, "guikv", 0.2, spans={"context": (0, N)})
    gui, tokens = run(model, "guikv", 0.2)
    keep = tokens_per_head(0.2, N)
    zeroed = int((1 - keep / N) * (PREV[1] - PREV[0]))  # the authors' count of redundant earlier tokens
    for layer, (with_spans, without) in enumerate(zip(gui["kept"], plain["kept"], strict=True)):
        assert [len(p) for p in with_spans] == [keep] * N_HEADS  # uniform budget, one cache per query head
        cur = sum(inside(p, CUR) for p in with_spans)
        assert cur > sum(inside(p, CUR) for p in without), f"layer {layer}: saliency keeps more of the screenshot"
        # the zeroed earlier tokens score 0 and there are enough positive candidates: never kept
        assert all(inside(p, PREV) <= PREV[1] - PREV[0] - zeroed for p in with_spans)
    assert gui["lens_after"][0].tolist() == [keep + 3] * N_HEADS  # 4 tokens generated, 3 decode forwards
    assert tokens[0] == plain_first_token(model)  # prefill attention uses the full cache: the first token is exact


def plain_first_token(model) -> int:
    with Engine(model, *load_method("fullkv"), budget=1.0) as eng:
        eng.reset()
        return int(eng.forward(ids(), compress=True).argmax())


def test_guikv_query_head_cache_holds_g_times_the_bytes_of_the_gqa_variant(tiny_model) -> None:
    model = tiny_model("llama")
    authors, _ = run(model, "guikv", 0.2)
    gqa, _ = run(model, "guikv_gqa", 0.2)
    keep = tokens_per_head(0.2, N)
    assert gqa["stats"]["kv_bytes_kept"] == N_LAYERS * N_KV_HEADS * keep * HEAD_DIM * 4 * 2  # fp32 K + V
    assert authors["stats"]["kv_bytes_kept"] == G * gqa["stats"]["kv_bytes_kept"]
    assert authors["stats"]["kv_bytes_full"] == gqa["stats"]["kv_bytes_full"]  # the same uncompressed reference
    assert all(len(layer) == N_KV_HEADS for layer in gqa["kept"])


def test_guikv_gqa_variant_scores_are_the_group_max_of_the_authors_scores() -> None:
    """Hand-made layer: the GQA-aware scores equal the max over each KV head's query heads of the per-query-head
    scores computed on the repeated cache (saliency and redundancy included)."""
    gen = torch.Generator().manual_seed(0)
    n, d = 40, 16  # the current screenshot's 10 keys span a 10-dim basis of the 16-dim key space
    queries = torch.randn(N_HEADS, n, d, generator=gen)
    keys = torch.randn(N_KV_HEADS, n, d, generator=gen)
    keys[:, 2:6] = keys[:, 30:34]  # earlier screenshot [2, 10) duplicates part of the current one [26, 36)
    hidden = torch.randn(n, 16, generator=gen)
    spans = {"image:0": (2, 10), "image:1": (26, 36)}

    def ctx(k: torch.Tensor, q: torch.Tensor) -> LayerContext:
        return LayerContext(0, 1, torch.nn.Identity(), q, k, k, torch.arange(n), 4, 12, d**-0.5,
                            hidden_states=hidden, spans=spans)

    per_query = GUIKV(window=4, cache="query_head").score(ctx(keys.repeat_interleave(G, 0), queries))  # (H_q, 36)
    gqa = GUIKV(window=4, cache="kv_head", gqa="max").score(ctx(keys, queries))  # (H_kv, 36)
    torch.testing.assert_close(gqa, per_query.view(N_KV_HEADS, G, -1).max(1).values)
    assert (per_query[:, 2:6] == 0).all(), "duplicates of current keys within the basis are zeroed in every head"


def test_guikv_svd_variant_and_bad_options() -> None:
    assert GUIKV(basis="svd").basis == "svd"
    for bad in ({"basis": "pca"}, {"rank": 0}, {"temperature": 0.0}, {"gqa": "median"}):
        with pytest.raises(UsageError):
            GUIKV(**bad)


@pytest.mark.parametrize("name", ["guikv", "zipvl", "zipvl_evict"])
def test_whole_prompt_methods_refuse_prefill_chunk(name: str) -> None:
    method, allocator = load_method(name)
    with pytest.raises(IncompatibleError, match="prefill_chunk"):
        check_compatible(method, allocator, "query_aware", 64)
    check_compatible(method, allocator, "query_aware", None)


@pytest.mark.parametrize(("name", "budget"), [("guikv", 0.2), ("guikv_gqa", 0.2), ("zipvl", 1.0),
                                              ("zipvl_evict", 0.3)])
def test_query_agnostic_protocol_context_then_questions(tiny_model, name: str, budget: float) -> None:
    """The context is compressed alone (its spans), then two questions are answered over the same cache."""
    method, allocator = load_method(name)
    with Engine(tiny_model("qwen3"), method, allocator, budget=budget) as eng:
        eng.reset()
        eng.spans = dict(SPANS)
        eng.forward(ids(), compress=True)
        entries = eng.store.n_entries()
        snap = eng.snapshot()
        answers = []
        for seed in (1, 2):
            eng.rollback(snap)
            logits = eng.forward(ids(seed, 12))
            answers.append(eng.generate(logits, 4)[0])
            assert eng.store.n_entries() == entries + eng.store.layers[0].n_heads * N_LAYERS * (12 + 3)
        eng.rollback(snap)
        assert eng.store.n_entries() == entries
    assert all(len(a) == 4 for a in answers)


# -- ZipVL ----------------------------------------------------------------------------------------------------------
def test_zipvl_plans_important_tokens_high_and_the_rest_low_in_packed_bytes(tiny_model) -> None:
    state, tokens = run(tiny_model("llama"), "zipvl", 1.0)
    for i, layer in enumerate(state["layers"]):
        p = state["layer_stats"][i]["important_tokens"]
        assert 0 < p < N and state["layer_stats"][i]["important_ratio"] == p / N
        counts = layer.precision_counts()
        assert counts["k"] == counts["v"] == {4: p * N_KV_HEADS, 2: (N - p) * N_KV_HEADS}
        assert layer.nbytes() == mixed_bytes(p, N, N_KV_HEADS, HEAD_DIM)
        # one token set per layer: every head holds its important tokens at 4 bits
        high = [layer.positions[layer.k.bits == 4].view(N_KV_HEADS, p)[h] for h in range(N_KV_HEADS)]
        assert all(torch.equal(high[0], x) for x in high)
    assert state["stats"]["kv_bytes_kept"] == sum(mixed_bytes(state["layer_stats"][i]["important_tokens"], N,
                                                              N_KV_HEADS, HEAD_DIM) for i in range(N_LAYERS))
    assert state["stats"]["kv_bytes_full"] == N_LAYERS * N_KV_HEADS * N * HEAD_DIM * 4 * 2
    assert len(tokens) == 4 and state["lens_after"][0].tolist() == [N + 3] * N_KV_HEADS


def test_zipvl_scoring_is_timed_as_compression_once_per_layer_and_feeds_both_uses(tiny_model, monkeypatch) -> None:
    """The engine plans a layer before the method's own prefill attention: ``important`` (the probe scoring) runs
    once per layer, inside the compression time, and the sparse attention and the stored plan use that set."""
    calls: list[tuple[str, int]] = []
    important, attention = ZipVL.important, ZipVL.prefill_attention

    def slow_important(self, ctx):
        calls.append(("important", ctx.layer_idx))
        time.sleep(0.02)
        return important(self, ctx)

    def logged_attention(self, ctx, backend):
        calls.append(("attention", ctx.layer_idx))
        return attention(self, ctx, backend)

    monkeypatch.setattr(ZipVL, "important", slow_important)
    monkeypatch.setattr(ZipVL, "prefill_attention", logged_attention)
    method, allocator = load_method("zipvl")
    with Engine(tiny_model("llama"), method, allocator, budget=1.0) as eng:
        eng.reset()
        eng.forward(ids(), compress=True)
        assert calls == [(kind, i) for i in range(N_LAYERS) for kind in ("important", "attention")]
        assert eng.compress_seconds >= 0.02 * N_LAYERS
        for i, layer in enumerate(eng.store.layers):  # the plan stored is the set the attention used
            assert layer.precision_counts()["k"][4] == eng.layer_stats[i]["important_tokens"] * N_KV_HEADS


def mixed_bytes(p: int, n: int, h: int, d: int, group: int = 32, high: int = 4, low: int = 2, fp: int = 4) -> int:
    """Expected bytes of a ZipVL layer: codes of every (head, token) at its bits; keys: one fp32 scale and zero per
    channel for every group of ``group`` same-precision tokens of a head; values: one scale and zero per token
    (head_dim 16 < group: one channel group)."""
    codes = h * (p * d * high // 8 + (n - p) * d * low // 8)
    key_groups = h * (-(-p // group) + -(-(n - p) // group))
    return 2 * codes + key_groups * d * 2 * fp + h * n * 2 * fp


def test_zipvl_sparse_prefill_attends_among_the_important_tokens_only() -> None:
    gen = torch.Generator().manual_seed(1)
    n, d = 24, 8
    q, k, v = (torch.randn(h, n, d, generator=gen) for h in (N_HEADS, N_KV_HEADS, N_KV_HEADS))
    method = ZipVL(recent=4, random=4, tau=0.7)

    def ctx() -> LayerContext:
        return LayerContext(0, 1, torch.nn.Identity(), q, k, v, torch.arange(n), 0, n, d**-0.5)

    c = ctx()
    out = method.prefill_attention(c, "sdpa")  # (n, H_q, d)
    keep = c.memo["zipvl_important"]
    p = int(keep.sum())
    assert 0 < p < n and c.stats["important_tokens"] == p
    assert c.stats["prefill_attention_flops_saved"] == pytest.approx(1 - p * p / (n * n))
    assert (out[~keep] == 0).all()
    # reference: masked softmax over the important keys at or before each important query
    kk, vv = k.repeat_interleave(G, 0), v.repeat_interleave(G, 0)
    logits = (q @ kk.transpose(1, 2)) * d**-0.5  # (H_q, n, n)
    allowed = torch.ones(n, n, dtype=torch.bool).tril() & keep[None, :]
    ref = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1) @ vv  # (H_q, n, d)
    torch.testing.assert_close(out[keep], ref.transpose(0, 1)[keep], atol=1e-5, rtol=0)
    dense = ZipVL(recent=4, random=4, tau=0.7, sparse_prefill=False)
    c2 = ctx()
    torch.testing.assert_close(dense.prefill_attention(c2, "sdpa"),
                               causal_attention(q[None], k[None], v[None], d**-0.5, "sdpa")[0])
    assert torch.equal(c2.memo["zipvl_important"], keep) and c2.stats["prefill_attention_flops_saved"] == 0.0


def test_zipvl_sparse_prefill_changes_the_first_token_logits_and_dense_prefill_does_not(tiny_model) -> None:
    model = tiny_model("llama")
    full, _ = run(model, "fullkv", 1.0, steps=1)
    sparse, _ = run(model, "zipvl", 1.0, steps=1)
    dense, _ = run(model, "zipvl", 1.0, steps=1, overrides=("method.sparse_prefill=false",))
    assert torch.equal(dense["logits"], full["logits"])  # dense prefill attention: ZipVL only compresses the KV
    assert (sparse["logits"] - full["logits"]).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["zipvl", "zipvl_evict"])
def test_zipvl_recompresses_the_newest_tokens_every_interval(tiny_model, name: str) -> None:
    method, allocator = load_method(name, ("method.recompress_every=10", "method.tau=0.6"))  # 10 tokens: evict some
    with Engine(tiny_model("mistral"), method, allocator, budget=1.0) as eng:
        eng.reset()
        logits = eng.forward(ids(), compress=True)
        after_prefill = eng.store.layers[0].lens.clone()
        for step in range(1, 26):
            logits = eng.forward([int(logits.argmax())])
            layer = eng.store.layers[0]
            assert layer.pending_tokens() == step % 10, f"step {step}"  # planned every 10 new tokens
        bits = layer.k.bits.view(layer.n_heads, -1)
        tail = bits[:, -5:]
        assert (tail == 16).all() and layer.k.pending.view(layer.n_heads, -1)[:, -5:].all()
        if name == "zipvl":  # the 20 planned decode tokens of every head are at 4 or 2 bits
            assert set(bits[:, -25:-5].unique().tolist()) <= {2, 4} and (layer.lens == after_prefill + 25).all()
        else:  # v2: evicted among them, the rest in full precision
            assert (layer.lens < after_prefill + 25).all() and (layer.lens >= after_prefill + 5 + 2).all()


def test_zipvl_evict_caps_at_the_budget_and_keeps_the_tau_count_at_one(tiny_model) -> None:
    model = tiny_model("llama")
    free, _ = run(model, "zipvl_evict", 1.0)
    capped, _ = run(model, "zipvl_evict", 0.1)
    for i in range(N_LAYERS):
        p = free["layer_stats"][i]["important_tokens"]
        assert [len(x) for x in free["kept"][i]] == [p] * N_KV_HEADS and p < N
        assert [len(x) for x in capped["kept"][i]] == [min(p, tokens_per_head(0.1, N))] * N_KV_HEADS
        assert free["layers"][i].precision_counts()["k"] == {16: p * N_KV_HEADS}
    assert capped["stats"]["kv_bytes_kept"] == N_LAYERS * N_KV_HEADS * 20 * HEAD_DIM * 4 * 2


def test_plan_methods_refuse_other_allocators_and_budgets(tiny_model) -> None:
    method, _ = load_method("zipvl_evict")
    with pytest.raises(UsageError, match="allocator"):
        Engine(tiny_model("llama"), method, load_method("adakv")[1], budget=1.0)
    with pytest.raises(UsageError, match="budget=1.0"):  # a quantising method without a plan has no token budget
        Engine(tiny_model("llama"), load_method("kivi")[0], Uniform(), budget=0.5)
    for bad in ({"tau": 0.0}, {"bits_high": 3}, {"recent": 0}):
        with pytest.raises(UsageError):
            ZipVL(**bad)


def test_apply_tail_plan_keeps_earlier_entries_as_they_are() -> None:
    gen = torch.Generator().manual_seed(0)
    h, n, d = 2, 12, 8
    layer = QuantLayerKV.from_dense(torch.randn(h, n, d, generator=gen), torch.randn(h, n, d, generator=gen),
                                    torch.arange(n), QuantSpec(2, 2, 4, None))
    first = torch.tensor([HIGH, LOW] * 6, dtype=torch.int8).expand(h, n)
    layer.apply_tail_plan(first, 4, 2)
    before = layer.k.bits.clone()
    layer.append(torch.randn(h, 3, d, generator=gen), torch.randn(h, 3, d, generator=gen), torch.arange(n, n + 3))
    assert layer.pending_tokens() == 3
    layer.apply_tail_plan(torch.tensor([[EVICT, HIGH, LOW], [HIGH, HIGH, EVICT]], dtype=torch.int8), 4, 2)
    assert layer.lens.tolist() == [n + 2, n + 2] and layer.pending_tokens() == 0
    bits = layer.k.bits.view(-1).tolist()
    assert bits[:n] == before[:n].tolist() and bits[n : n + 2] == [4, 2]  # head 0: earlier as before, tail planned
    assert layer.head(1)[2].tolist() == [*range(n), n, n + 1]  # head 1 evicted its last new token


def test_zipvl_keep_last_makes_the_last_token_important_within_the_same_count_at_the_cap() -> None:
    n, d = 16, 8
    q = torch.zeros(N_HEADS, n, d)
    k = torch.zeros(N_KV_HEADS, n, d)
    k[:, 0, 0] = 20.0  # every probe attends to token 0: the plain rule marks only it (and its neighbours) important
    q[:, :, 0] = 1.0
    v = torch.randn(N_KV_HEADS, n, d, generator=torch.Generator().manual_seed(0))

    def ctx(keep: int) -> LayerContext:
        return LayerContext(0, 1, torch.nn.Identity(), q, k, v, torch.arange(n), 0, keep, d**-0.5)

    plain = ZipVL(recent=4, random=2, tau=0.5, keep_last=False).important(ctx(n))
    assert not plain[-1] and plain[0]
    ours = ZipVL(recent=4, random=2, tau=0.5).important(ctx(n))
    assert ours[-1] and torch.equal(ours[:-1], plain[:-1])  # added on top below the cap
    capped = ZipVL(recent=4, random=2, tau=0.5).important(ctx(int(plain.sum())))
    assert capped[-1] and int(capped.sum()) == int(plain.sum())  # at the cap it replaces the weakest


def test_zipvl_below_budget_one_caps_its_high_precision_tokens_and_keeps_every_token(tiny_model) -> None:
    free, _ = run(tiny_model("llama"), "zipvl", 1.0)
    capped, _ = run(tiny_model("llama"), "zipvl", 0.1)
    cap = int(0.1 * N)
    for i, layer in enumerate(capped["layers"]):
        p = capped["layer_stats"][i]["important_tokens"]
        assert p == min(cap, free["layer_stats"][i]["important_tokens"])
        assert layer.precision_counts()["k"] == {4: p * N_KV_HEADS, 2: (N - p) * N_KV_HEADS}  # nothing evicted
        assert layer.nbytes() == mixed_bytes(p, N, N_KV_HEADS, HEAD_DIM)

"""CAKE: preference and indicator on hand-made attention, the authors' budget adjustment, cascading (same final
cache as one-shot eviction, bounded prefill peak) and decode-time eviction (every layer stays at its budget)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ARCHS, N_KV_HEADS, N_LAYERS, load_method
from torch import nn

from kvbench.budget import LayerScores, tokens_per_head
from kvbench.engine import Engine
from kvbench.engine.context import LayerContext
from kvbench.errors import UsageError
from methods.cake import CAKE, CakeAllocator, adjust_budgets, tau_for

# Two query heads on one KV head (G = 2), window w = 2, n = 6: rows are window queries, columns non-window keys.
HAND = torch.tensor([
    [[0.5, 0.5, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]],
    [[0.25, 0.25, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25]],
])


def hand_ctx(attn: torch.Tensor = HAND, keep: int = 4) -> LayerContext:
    hq, w, m = attn.shape
    ctx = LayerContext(layer_idx=0, n_layers=1, module=nn.Identity(), queries=torch.zeros(hq, w, 4),
                       keys=torch.zeros(1, m + w, 4), values=torch.zeros(1, m + w, 4),
                       positions=torch.arange(m + w), window=w, keep=keep, scaling=0.5)
    ctx.memo[f"window_attention:{w}"] = attn  # the attention the method would otherwise compute from q/k
    return ctx


def test_preference_is_entropy_times_variance_with_taus():
    # entropy: head 0 has two rows with two 0.5 entries (ln 2 each), head 1 two uniform rows (ln 4 each) -> 6 ln 2
    # unbiased variance over the 2 window queries: head 0 columns (0.5,0) and (0,0.5) -> 0.125 each; head 1: 0
    ctx = hand_ctx()
    CAKE(window=2, kernel=3, tau1=1.0, tau2=1.0).score(ctx)
    assert ctx.stats["preference"] == pytest.approx(6 * math.log(2) * 0.25, rel=1e-5)
    ctx = hand_ctx()
    CAKE(window=2, kernel=3, tau1=2.0, tau2=0.5).score(ctx)
    assert ctx.stats["preference"] == pytest.approx(math.sqrt(6 * math.log(2)) * 0.25**2, rel=1e-5)
    assert ctx.stats["seq_len"] == 6


def test_indicator_is_pooled_mean_plus_gamma_variance_then_group_mean():
    # head 0: mean (0.5, 0.25, 0.25, 0) + 200 * var (0, 0.125, 0.125, 0) = (0.5, 25.25, 25.25, 0); head 1: 0.25 each;
    # avg-pool k=3 with zero padding divides edges by 3; the KV head takes the mean of its two query heads.
    scores = CAKE(window=2, kernel=3, gamma=200.0, tau1=1.0, tau2=1.0).score(hand_ctx())
    h0 = torch.tensor([25.75, 51.0, 50.5, 25.25]) / 3
    h1 = torch.tensor([0.5, 0.75, 0.75, 0.5]) / 3
    torch.testing.assert_close(scores, ((h0 + h1) / 2)[None], rtol=1e-5, atol=1e-6)


def test_decode_score_uses_only_the_new_query():
    # one query (d = 1, scale 1) against keys (0, ln2, ln3, 0, 0): softmax (1, 2, 3, 1, 1) / 8; window 2 dropped;
    # avg-pool k=3 of (0.125, 0.25, 0.375) -> (0.125, 0.25, 0.2083)
    keys = torch.tensor([0.0, math.log(2), math.log(3), 0.0, 0.0]).reshape(1, 5, 1)
    ctx = LayerContext(layer_idx=0, n_layers=1, module=nn.Identity(), queries=torch.ones(1, 1, 1), keys=keys,
                       values=keys.clone(), positions=torch.arange(5), window=2, keep=3, scaling=1.0)
    got = CAKE(window=2, kernel=3).decode_score(ctx)
    torch.testing.assert_close(got, torch.tensor([[0.125, 0.25, 0.625 / 3]]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("budgets", "total", "seq_len", "expected"), [
    ([10.7, 20.2, 30.9], 60, 100, [10, 20, 30]),  # floor; the sum already matches
    ([150.0, 30.0, 20.0], 200, 100, [100, 55, 45]),  # clamp at seq_len; the excess 50 split over the other two
    # excess 50 over 3 layers: 16 each + 1 to the first two; then the missing 1 goes to the first eligible layer
    ([150.0, 30.0, 20.0, 0.5], 201, 100, [100, 48, 37, 16]),
    ([10.9, 10.9, 0.2], 18, 100, [9, 9, 0]),  # over by 2 after flooring: removed from the layers > 1
    ([5.0, 1.0, 1.0], 4, 100, [2, 1, 1]),  # removing 3 from [5,1,1]: only layer 0 is > 1 -> all from it
])
def test_adjust_budgets_is_the_authors_integer_adjustment(budgets, total, seq_len, expected):
    assert adjust_budgets(budgets, total, seq_len) == expected


def layer(pref: float, m: int, n: int, h: int = 2) -> LayerScores:
    return LayerScores(torch.rand(h, m), n, {"preference": pref, "seq_len": n})


def test_allocator_splits_the_pool_by_preference():
    # C = 10 tokens per head with window 2 -> pool T = 2 * 8 = 16, split 1:3 over two layers
    plan = CakeAllocator().plan({0: layer(1.0, 18, 20), 1: layer(3.0, 18, 20)}, keep=10, n_layers=2)
    assert {i: c.tolist() for i, c in plan.items()} == {0: [4, 4], 1: [12, 12]}
    # cascading: after layer 0 alone the whole pool T is its share (clamped to its n - w candidates)
    assert CakeAllocator().plan({0: layer(1.0, 18, 20)}, keep=10, n_layers=2)[0].tolist() == [16, 16]
    # clamp: raw (0.16, 15.8) -> floor (0, 15) -> clamp at 13, the excess 2 to layer 0 -> the missing 1 too
    plan = CakeAllocator().plan({0: layer(1.0, 13, 15), 1: layer(100.0, 13, 15)}, keep=10, n_layers=2)
    assert plan[0].tolist() == [3, 3] and plan[1].tolist() == [13, 13]


def test_allocator_skips_short_prompts_and_needs_preferences():
    assert CakeAllocator().plan({0: layer(1.0, 10, 12)}, keep=10, n_layers=1) == {}  # n <= C + w
    with pytest.raises(UsageError, match="method=cake"):
        CakeAllocator().plan({0: LayerScores(torch.rand(2, 18), 20, {})}, keep=10, n_layers=1)


def test_tau_table_by_model_and_cache_size():
    assert tau_for("meta-llama/Llama-3.1-8B-Instruct", 128) == (1.6, 0.6)
    assert tau_for("mistralai/Mistral-7B-Instruct-v0.3", 1024) == (0.8, 0.5)
    assert tau_for("Qwen/Qwen2.5-7B-Instruct", 512) == (1.0, 1.0)  # only C = 128 and 1024 are tabulated
    assert tau_for("embedded:kvbench-tiny", 128) == (1.0, 1.0)
    assert CAKE(model="Qwen/Qwen2.5-7B-Instruct", tau2=0.3).taus(128) == (0.4, 0.3)
    with pytest.raises(UsageError, match="tau1"):
        CAKE(tau1=-1.0)


def prefill(model, name: str, ids: torch.Tensor, budget: float):
    method, allocator = load_method(name)
    with Engine(model, method, allocator, budget=budget) as eng:
        eng.reset()
        eng.forward(ids, compress=True)
        positions = [[ly.head(h)[2].tolist() for h in range(ly.n_heads)] for ly in eng.store.layers]
        return positions, eng.store.nbytes(), eng.store.peak_bytes


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("budget", [0.3, 0.1])
def test_cascading_gives_the_one_shot_cache_with_a_bounded_peak(tiny_model, prompt, arch, budget):
    n = 256
    ids = prompt(n, seed=ARCHS.index(arch))
    pos_c, kept_c, peak_c = prefill(tiny_model(arch), "cake", ids, budget)
    pos_o, kept_o, peak_o = prefill(tiny_model(arch), "cake_nocascade", ids, budget)
    assert pos_c == pos_o and kept_c == kept_o
    full = kept_o / sum(len(h) for ly in pos_o for h in ly) * n * N_LAYERS * N_KV_HEADS
    layer_bytes = full / N_LAYERS
    assert peak_o == pytest.approx(full)  # one-shot holds every layer in full until the last one is scored
    assert peak_c <= kept_c + layer_bytes + 1e-6  # cascading: at most the final cache plus one full layer
    assert peak_c < peak_o


@pytest.mark.parametrize("arch", ARCHS[:2])
def test_decode_eviction_keeps_every_layer_at_its_budget(tiny_model, prompt, arch):
    method, allocator = load_method("cake")
    n, budget = 200, 0.2
    with Engine(tiny_model(arch), method, allocator, budget=budget) as eng:
        eng.reset()
        logits = eng.forward(prompt(n), compress=True)
        after_prefill = [ly.lens.tolist() for ly in eng.store.layers]
        budgets = dict(eng.decode_budget)
        w = min(method.window, tokens_per_head(budget, n))
        assert all(after_prefill[i] == [b + w] * N_KV_HEADS for i, (b, _) in budgets.items())
        tokens, _ = eng.generate(logits, 6)
        for i, ly in enumerate(eng.store.layers):
            assert ly.lens.tolist() == after_prefill[i], "one token evicted per head per step"
            for h in range(ly.n_heads):
                pos = ly.head(h)[2].tolist()
                assert pos[-w:] == list(range(n + 5 - w, n + 5)), "the newest w tokens are never evicted"
    assert len(tokens) == 6


@pytest.mark.parametrize("arch", ARCHS[:2])
@pytest.mark.parametrize("n", [20, 60])  # 20: shorter than C; 60: in (C, C + w], which CAKE does not compress either
def test_short_prompt_still_decodes_at_the_budget(tiny_model, prompt, arch, n):
    """The authors record C - w for every layer they do not compress and evict to it while decoding: a prompt that
    needed no compression grows to C tokens per head, then stays there (it used to grow without bound)."""
    method, allocator = load_method("cake")
    c, w, steps = 48, 32, 40  # budget = 48 tokens per head (window included), window 32
    seen: list[tuple[int, list[list[int]], list[list[int]]]] = []

    def record(tokens: list[int]) -> bool:  # called before the forward of token len(tokens): len - 1 steps done
        layers = eng.store.layers
        seen.append((len(tokens) - 1, [ly.lens.tolist() for ly in layers],
                     [ly.head(h)[2][-w:].tolist() for ly in layers for h in range(ly.n_heads)]))
        return False

    with Engine(tiny_model(arch), method, allocator, budget=c) as eng:
        eng.reset()
        logits = eng.forward(prompt(n, seed=n), compress=True)
        assert eng.decode_budget == dict.fromkeys(range(N_LAYERS), (c - w, w))
        eng.generate(logits, steps + 1, should_stop=record)
    assert [k for k, _, _ in seen] == list(range(steps))
    for k, lens, recent in seen:
        expected = n if k == 0 else min(n + k, c)  # a prompt in (C, C + w] drops to C at the first decode step
        assert lens == [[expected] * N_KV_HEADS] * N_LAYERS, f"after {k} decode steps"
        total = n + k
        assert all(pos == list(range(max(0, total - w), total)) for pos in recent), "the newest w tokens stay"


def test_budget_one_sets_no_decode_budget(tiny_model, prompt):
    method, allocator = load_method("cake")
    with Engine(tiny_model("llama"), method, allocator, budget=1.0) as eng:
        eng.reset()
        tokens, _ = eng.generate(eng.forward(prompt(40), compress=True), 12)
        assert eng.decode_budget == {} and [ly.lens.tolist() for ly in eng.store.layers] == [[51] * 2] * N_LAYERS


def test_query_agnostic_rollback_undoes_decode_eviction(tiny_model, prompt):
    method, allocator = load_method("cake")
    with Engine(tiny_model("llama"), method, allocator, budget=0.2) as eng:
        eng.reset()
        eng.forward(prompt(200), compress=True)
        before = [(ly.keys.clone(), ly.positions.clone()) for ly in eng.store.layers]
        snap = eng.snapshot()
        answers = []
        for _ in range(2):
            eng.rollback(snap)
            tokens, _ = eng.generate(eng.forward(prompt(12, seed=3)), 8)
            answers.append(tokens)
        eng.rollback(snap)
        for (k, p), ly in zip(before, eng.store.layers, strict=True):
            assert torch.equal(k, ly.keys) and torch.equal(p, ly.positions)
    assert answers[0] == answers[1]


def test_variants_are_configs():
    for name, cascading, decode in (("cake", True, True), ("cake_nocascade", False, True),
                                    ("cake_nodecode", False, False)):
        method, allocator = load_method(name)
        assert (method.cascading, method.decode_evict, allocator.name) == (cascading, decode, "cake")

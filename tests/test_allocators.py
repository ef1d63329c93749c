"""Budgets and allocators against hand-computed numbers (methods_core §2.5, §2.6)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import N_KV_HEADS, load_method
from torch import nn

from kvbench.budget import (
    HeadAdaptive,
    Pyramid,
    Uniform,
    check_budget,
    compression_ratio,
    default_decode_budget,
    tokens_per_head,
)
from kvbench.engine import Engine, LayerContext, select_tokens
from kvbench.errors import UsageError


def scores(h: int, m: int) -> torch.Tensor:
    return torch.rand(h, m, generator=torch.Generator().manual_seed(h * 1000 + m))


def layer_ctx(n: int, h: int, window: int, keep: int) -> LayerContext:
    """A layer of n tokens per head whose last ``window`` are always kept (what allocators read from ctx)."""
    z = torch.zeros(h, n, 1)
    return LayerContext(layer_idx=0, n_layers=1, module=nn.Identity(), queries=z, keys=z, values=z,
                        positions=torch.arange(n), window=window, keep=keep, scaling=1.0)


# ---------------------------------------------------------------------------------------------------------------
# budget parsing
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, "0.5", "128", None, True, False, [0.5], float("inf"), float("nan")])
def test_check_budget_rejects(bad):
    with pytest.raises(ValueError, match="budget"):
        check_budget(bad)


@pytest.mark.parametrize(("good", "expected"), [(0.5, 0.5), (1, 1.0), (1.0, 1.0), (128, 128.0), (1e-3, 1e-3)])
def test_check_budget_accepts(good, expected):
    out = check_budget(good)
    assert isinstance(out, float) and out == expected


@pytest.mark.parametrize(
    ("budget", "n", "expected"),
    [
        (1.0, 200, 200),  # everything
        (1, 200, 200),  # 1 is the fraction 1.0, not one token
        (0.5, 200, 100),
        (0.1, 200, 20),
        (0.3, 10, 3),  # 0.3 * 10 = 3.0000000000000004
        (0.7, 10, 7),  # 0.7 * 10 = 7.000000000000001
        (0.29, 100, 29),  # 0.29 * 100 = 28.999999999999996: floored with a tolerance, not to 28
        (0.999, 200, 199),
        (0.001, 200, 1),  # at least one token
        (128, 200, 128),  # tokens per head
        (128.9, 200, 128),
        (1.5, 200, 1),
        (500, 200, 200),  # never more than n
        (0.5, 1, 1),
    ],
)
def test_tokens_per_head(budget, n, expected):
    assert tokens_per_head(budget, n) == expected


def test_compression_ratio():
    assert compression_ratio(0.2) == pytest.approx(0.8)
    assert compression_ratio(50, 200) == pytest.approx(0.75)
    assert compression_ratio(500, 200) == 0.0
    assert math.isnan(compression_ratio(50))


# ---------------------------------------------------------------------------------------------------------------
# Uniform
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("keep", "m", "expected"), [(10, 50, 10), (0, 50, 0), (60, 50, 50)])
def test_uniform(keep, m, expected):
    for layer in range(4):
        assert Uniform().allocate(scores(3, m), keep, layer, 4).tolist() == [expected] * 3


# ---------------------------------------------------------------------------------------------------------------
# Pyramid (methods_core §2.5)
# ---------------------------------------------------------------------------------------------------------------
def pyramid(alloc: Pyramid, keep: int, m: int, n_layers: int, h: int = 2) -> list[int]:
    out = []
    for layer in range(n_layers):
        counts = alloc.allocate(scores(h, m), keep, layer, n_layers)
        assert counts.dtype == torch.long and counts.shape == (h,)
        assert len(set(counts.tolist())) == 1, "every head of a layer keeps the same number"
        out.append(int(counts[0]))
    return out


def test_pyramid_schedule_hand_computed():
    # b = 100, beta = 20, L = 4, m large: m_min = 5, m_max = 195, step = 190 // 3 = 63
    assert pyramid(Pyramid(beta=20), 100, 10_000, 4) == [195, 132, 69, 6]
    # the floored step makes the total exceed L * b (methods_core check P1): 402 > 400
    assert sum(pyramid(Pyramid(beta=20), 100, 10_000, 4)) == 402
    # L = 3: step = 190 // 2 = 95, no flooring loss
    assert pyramid(Pyramid(beta=20), 100, 10_000, 3) == [195, 100, 5]
    # b = 64, beta = 20, L = 5: m_min = 3, m_max = 125, step = 122 // 4 = 30
    assert pyramid(Pyramid(beta=20), 64, 1000, 5) == [125, 95, 65, 35, 5]
    # b = 70: m_min = 3, m_max = 137, step = 134 // 3 = 44 (floored, not rounded to 45)
    assert pyramid(Pyramid(beta=20), 70, 1000, 4) == [137, 93, 49, 5]
    # beta = 10: m_min = 10, m_max = 190, step = 60
    assert pyramid(Pyramid(beta=10), 100, 1000, 4) == [190, 130, 70, 10]


def test_pyramid_clamp_when_m_max_reaches_the_candidates():
    # b = 100, m = 150: m_max = 195 >= 150 -> m_max = 150, m_min = 200 - 150 = 50, step = 100 // 3 = 33
    assert pyramid(Pyramid(), 100, 150, 4) == [150, 117, 84, 51]
    # m_max == m exactly: b = 100, beta = 20 -> m_max = 195; m = 195 -> m_min = 5, step = 63
    assert pyramid(Pyramid(), 100, 195, 4) == [195, 132, 69, 6]
    # keep > m: b is clamped to m first; b = m = 40 -> m_max = 40, m_min = 40, flat
    assert pyramid(Pyramid(), 60, 40, 3) == [40, 40, 40]


def test_pyramid_kvf_fallback():
    # n < 2b: KVCache-Factory falls back to the uniform b; without the flag the clamp rule applies
    assert pyramid(Pyramid(kvf_fallback=True), 100, 150, 4) == [100] * 4
    assert pyramid(Pyramid(kvf_fallback=False), 100, 150, 4) == [150, 117, 84, 51]
    # n >= 2b: the flag changes nothing
    assert pyramid(Pyramid(kvf_fallback=True), 100, 10_000, 4) == [195, 132, 69, 6]


def kvf_pyramid(q_len: int, capacity: int, window: int, beta: int, n_layers: int) -> list[int] | None:
    """KVCache-Factory's ``PyramidKVCluster.update_kv`` schedule (c97f9d7), non-window tokens kept per layer, as a
    plain transcription of its integer rules: None = no compression (q_len < max_capacity_prompt)."""
    b = capacity - window
    if q_len < capacity:
        return None
    if q_len < b * 2:  # the fallback: the whole prompt length against twice the non-window budget
        return [b] * n_layers
    min_num, max_num = b // beta, b * 2 - b // beta
    if max_num >= q_len - window:
        max_num = q_len - window
        min_num = b * 2 - max_num
    steps = (max_num - min_num) // (n_layers - 1)
    return [max_num - layer * steps for layer in range(n_layers)]


def pyramid_in_layer(alloc: Pyramid, n: int, window: int, keep: int, n_layers: int) -> list[int]:
    """Pyramid counts as the engine asks for them: scores of the n - window candidates, keep = B - window."""
    ctx = layer_ctx(n, 2, window, keep + window)
    return [int(alloc.allocate(scores(2, n - window), keep, layer, n_layers, ctx=ctx)[0]) for layer in range(n_layers)]


@pytest.mark.parametrize(("n", "expected", "old_rule"), [
    (199, [100] * 4, [100] * 4),  # n < 2b = 200: uniform under both rules
    (200, [192, 131, 70, 9], [100] * 4),  # n = 2b: pyramid (clamped: m_max = m = 192, m_min = 8, step 61)
    (207, [195, 132, 69, 6], [100] * 4),  # n = 2b + w - 1: pyramid; the old m < 2b rule still fell back
    (208, [195, 132, 69, 6], [195, 132, 69, 6]),  # m = 2b: both rules agree again
])
def test_pyramid_kvf_fallback_boundary_hand_cases(n, expected, old_rule):
    # max_capacity_prompt B = 108, window 8: b = 100; beta 20: m_min = 5, m_max = 195; L = 4
    assert pyramid_in_layer(Pyramid(kvf_fallback=True), n, 8, 100, 4) == expected == kvf_pyramid(n, 108, 8, 20, 4)
    m = n - 8
    assert pyramid(Pyramid(kvf_fallback=True), 100, m, 4) == old_rule, "without a ctx, n = m (the old comparison)"


@pytest.mark.parametrize(("capacity", "window", "n_layers"), [(108, 8, 4), (64, 32, 3), (40, 8, 32), (21, 1, 2)])
def test_pyramid_kvf_fallback_matches_kvcache_factory_around_the_boundary(capacity, window, n_layers):
    b = capacity - window
    for n in range(capacity, 2 * b + 2 * window + 3):
        assert pyramid_in_layer(Pyramid(kvf_fallback=True), n, window, b, n_layers) == kvf_pyramid(
            n, capacity, window, 20, n_layers), f"n = {n}"


def test_pyramid_single_layer_and_zero_budget():
    assert pyramid(Pyramid(), 100, 1000, 1) == [100]
    assert pyramid(Pyramid(), 0, 1000, 4) == [0, 0, 0, 0]


# ---------------------------------------------------------------------------------------------------------------
# HeadAdaptive (methods_core §2.6)
# ---------------------------------------------------------------------------------------------------------------
HAND = torch.tensor(
    [
        [9.0, 8.0, 7.0, 1.0, 0.0],
        [6.0, 5.0, 0.5, 0.2, 0.1],
        [4.0, 3.0, 2.0, 0.3, 0.4],
    ]
)


def test_head_adaptive_alpha0_is_the_flattened_topk():
    # keep 2 -> 6 picks: 9, 8, 7 (head 0), 6, 5 (head 1), 4 (head 2)
    assert HeadAdaptive(alpha=0.0).allocate(HAND, 2, 0, 4).tolist() == [3, 2, 1]
    # keep 3 -> 9 picks: + 3, 2 (head 2) and 1 (head 0)
    assert HeadAdaptive(alpha=0.0).allocate(HAND, 3, 0, 4).tolist() == [4, 2, 3]
    # keep >= m: everything
    assert HeadAdaptive(alpha=0.0).allocate(HAND, 7, 0, 4).tolist() == [5, 5, 5]


@pytest.mark.parametrize("keep", [1, 2, 3, 4])
def test_head_adaptive_alpha0_total_is_exact(keep):
    s = scores(4, 30)
    counts = HeadAdaptive(alpha=0.0).allocate(s, keep, 0, 2)
    assert int(counts.sum()) == 4 * keep
    flat = s.reshape(-1).topk(4 * keep).indices // 30
    assert counts.tolist() == torch.bincount(flat, minlength=4).tolist()


def test_head_adaptive_safeguard_formula():
    # keep 2, alpha 0.2: floor(0.4) = 0; a = (3, 2, 1) -> round(2.4, 1.6, 0.8) = (2, 2, 1): total 5 != 6
    assert HeadAdaptive(alpha=0.2).allocate(HAND, 2, 0, 4).tolist() == [2, 2, 1]
    # H = 3, m = 20, keep 5, alpha 0.2: floor(1.0) = 1; head 0 holds the 9 best, heads 1-2 three each
    s = torch.zeros(3, 20)
    s[0, :9] = torch.arange(100.0, 91.0, -1)
    s[1, :3] = torch.tensor([50.0, 49.0, 48.0])
    s[2, :3] = torch.tensor([40.0, 39.0, 38.0])
    s[1, 3:] = torch.linspace(-1, -2, 17)
    s[2, 3:] = torch.linspace(-3, -4, 17)
    s[0, 9:] = torch.linspace(-5, -6, 11)
    counts = HeadAdaptive(alpha=0.2).allocate(s, 5, 0, 4)
    # a = (9, 3, 3): 9 * 0.8 + 1 = 8.2 -> 8, 3 * 0.8 + 1 = 3.4 -> 3: total 14, one under H * keep
    assert counts.tolist() == [8, 3, 3]
    assert HeadAdaptive(alpha=0.0).allocate(s, 5, 0, 4).tolist() == [9, 3, 3]


def test_head_adaptive_rounds_half_to_even():
    # alpha 0.5, keep 4: floor(2) = 2; cap = round(0.5 a + 2): a = 1 -> 2.5 -> 2, a = 3 -> 3.5 -> 4, a = 5 -> 4.5 -> 4
    s = torch.zeros(3, 10)
    s[0, :5] = torch.tensor([9.0, 8.9, 8.8, 8.7, 8.6])
    s[1, :3] = torch.tensor([7.0, 6.9, 6.8])
    s[2, :4] = torch.tensor([5.0, 4.9, 4.8, 4.7])
    s[:, :] = torch.where(s == 0, -torch.rand(3, 10, generator=torch.Generator().manual_seed(0)), s)
    # 12 picks: head 0 takes its 5, head 1 its 3, head 2 its 4 -> a = (5, 3, 4)
    assert HeadAdaptive(alpha=0.0).allocate(s, 4, 0, 2).tolist() == [5, 3, 4]
    # a = (5, 3, 4): 4.5 -> 4, 3.5 -> 4, 4.0 -> 4
    assert HeadAdaptive(alpha=0.5).allocate(s, 4, 0, 2).tolist() == [4, 4, 4]
    # a = (1, 5, 6): 2.5 -> 2, 4.5 -> 4, 5.0 -> 5
    s2 = torch.full((3, 10), -1.0) - torch.arange(30.0).reshape(3, 10) / 100
    s2[0, 0] = 9.0
    s2[1, :5] = torch.tensor([8.0, 7.9, 7.8, 7.7, 7.6])
    s2[2, :6] = torch.tensor([6.0, 5.9, 5.8, 5.7, 5.6, 5.5])
    assert HeadAdaptive(alpha=0.0).allocate(s2, 4, 0, 2).tolist() == [1, 5, 6]
    assert HeadAdaptive(alpha=0.5).allocate(s2, 4, 0, 2).tolist() == [2, 4, 5]


def test_head_adaptive_caps_never_exceed_candidates():
    s = scores(2, 6)
    for alpha in (0.0, 0.2, 0.5, 0.9):
        for keep in range(1, 9):
            counts = HeadAdaptive(alpha=alpha).allocate(s, keep, 0, 2)
            assert (counts >= 0).all() and (counts <= 6).all()


def test_head_adaptive_normalize():
    # head 0: top-1 mass 0.5 of total 1.0 -> x0.5; head 1: top-1 mass 0.3 of 0.33 -> x0.909
    s = torch.tensor([[0.5, 0.4, 0.1], [0.3, 0.02, 0.01]])
    assert HeadAdaptive(alpha=0.0).allocate(s, 1, 0, 2).tolist() == [2, 0]
    # normalised: head 0 -> (0.25, 0.2, 0.05), head 1 -> (0.2727, 0.018, 0.009): head 1's best now ranks first
    assert HeadAdaptive(alpha=0.0, normalize=True).allocate(s, 1, 0, 2).tolist() == [1, 1]


# ---------------------------------------------------------------------------------------------------------------
# HeadAdaptive, kvpress's safeguard (AdaKVPress.compress)
# ---------------------------------------------------------------------------------------------------------------
STEEP = torch.tensor(
    [
        [9.0, 8.0, 7.0, 6.0, 5.0],
        [4.0, 3.0, 2.0, 1.0, 0.5],
        [0.4, 0.3, 0.2, 0.1, 0.05],
    ]
)


@pytest.mark.parametrize(("alpha", "expected"), [
    (0.2, [5, 1, 0]),  # n_kept = 2 + 2 = 4, n_safe = int(0.8) = 0: the plain flattened top-6
    (0.5, [5, 1, 0]),  # n_safe = 2 = the window: nothing beyond the window is forced
    (0.75, [4, 1, 1]),  # n_safe = 3: one candidate per head forced (9, 4, 0.4), then the best 3 others (8, 7, 6)
    (1.0, [2, 2, 2]),  # n_safe = n_kept: every head keeps its own top 2 (uniform)
])
def test_kvpress_safeguard_hand_cases(alpha, expected):
    ctx = layer_ctx(7, 3, window=2, keep=4)  # 5 candidates + a window of 2 per head
    counts = HeadAdaptive(alpha=alpha, safeguard="kvpress").allocate(STEEP, 2, 0, 4, ctx=ctx)
    assert counts.tolist() == expected and int(counts.sum()) == 3 * 2, "kvpress keeps exactly H * keep"


def test_ffy0_and_kvpress_safeguards_differ():
    ctx = layer_ctx(7, 3, window=2, keep=4)
    # FFY0: a = (5, 1, 0), cap = round(a * 0.25 + floor(0.75 * 2)) = (2, 1, 1): two entries under H * keep
    assert HeadAdaptive(alpha=0.75).allocate(STEEP, 2, 0, 4, ctx=ctx).tolist() == [2, 1, 1]
    assert HeadAdaptive(alpha=0.75, safeguard="kvpress").allocate(STEEP, 2, 0, 4, ctx=ctx).tolist() == [4, 1, 1]
    # without a ctx there is no window: n_kept = keep = 2, n_safe = int(0.5 * 2) = 1 candidate forced per head
    assert HeadAdaptive(alpha=0.5, safeguard="kvpress").allocate(STEEP, 2, 0, 4).tolist() == [4, 1, 1]


def test_head_adaptive_rejects_unknown_safeguards():
    with pytest.raises(UsageError, match="safeguard"):
        HeadAdaptive(safeguard="kvf")
    with pytest.raises(UsageError, match="alpha"):
        HeadAdaptive(alpha=1.5)


def kvpress_adakv_kept(window_scores: torch.Tensor, window: int, n_kept: int, alpha: float) -> torch.Tensor:
    """NVIDIA/kvpress ``AdaKVPress.compress`` on the scores a kvpress ``ScorerPress`` returns: (H, n) with the last
    ``window`` columns padded with the maximum (as SnapKVPress does); returns the (H, n) bool mask of kept entries.

    n_safe = int(n_kept * alpha) top entries of every head are set to the dtype's max, then the globally lowest
    H * (n - n_kept) entries are masked out. A transcription of its rules for testing, not kvbench's code path.
    """
    h, n = window_scores.shape
    s = window_scores.clone()
    n_safe = int(n_kept * alpha)
    s.scatter_(-1, s.topk(n_safe, dim=-1).indices, torch.finfo(s.dtype).max)
    pruned = (-s.reshape(-1)).topk(h * (n - n_kept)).indices
    kept = torch.ones(h * n, dtype=torch.bool)
    kept[pruned] = False
    return kept.reshape(h, n)


@pytest.mark.parametrize(("h", "n", "window", "n_kept", "alpha"), [
    (2, 60, 8, 20, 0.2), (4, 60, 8, 20, 0.5), (4, 200, 32, 40, 0.2), (8, 200, 32, 100, 0.2), (3, 50, 4, 10, 1.0),
    (4, 120, 8, 30, 0.0), (2, 90, 16, 18, 0.9),
])
def test_kvpress_safeguard_keeps_exactly_what_adakvpress_keeps(h, n, window, n_kept, alpha):
    cand = torch.rand(h, n - window, generator=torch.Generator().manual_seed(n * h + n_kept))
    padded = torch.cat([cand, cand.new_full((h, window), float(cand.max()) + 1)], dim=1)  # kvpress's SnapKV padding
    ref = kvpress_adakv_kept(padded, window, n_kept, alpha)
    ctx = layer_ctx(n, h, window, n_kept)
    kept = select_tokens(cand, ctx, HeadAdaptive(alpha=alpha, safeguard="kvpress"))
    ours = torch.zeros(h, n, dtype=torch.bool)
    for head, idx in enumerate(kept):
        ours[head, idx] = True
    assert torch.equal(ours, ref)
    assert int(ours.sum()) == h * n_kept


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_defensivekv_papers_adakv_baseline_in_the_engine(tiny_model, prompt, arch):
    """kvpress's AdaKV (SnapKVPress: window 32, avg-pool 5, group mean; AdaKVPress alpha 0.2) as configs: every
    layer keeps exactly H * floor(budget * n) entries, window included, and exactly the entries AdaKVPress keeps."""
    overrides = ("allocator=head_adaptive_kvpress", "method.kernel=5", "method.pooling=avg")
    method, allocator = load_method("adakv", overrides)
    assert (allocator.safeguard, allocator.alpha, method.window) == ("kvpress", 0.2, 32)
    n, budget = 200, 0.3
    seen: list[torch.Tensor] = []  # the candidates' scores of every layer, as the method returned them
    score = method.score

    def spy(ctx: LayerContext) -> torch.Tensor:
        out = score(ctx)
        seen.append(out.clone())
        return out

    method.score = spy
    with Engine(tiny_model(arch), method, allocator, budget=budget) as eng:
        eng.reset()
        eng.forward(prompt(n, seed=5), compress=True)
        layers = eng.store.layers
        kept = [[ly.head(h)[2].tolist() for h in range(ly.n_heads)] for ly in layers]
    n_kept = tokens_per_head(budget, n)
    for cand, layer in zip(seen, kept, strict=True):
        padded = torch.cat([cand, cand.new_full((cand.shape[0], 32), float(cand.max()) + 1)], dim=1)
        ref = kvpress_adakv_kept(padded, 32, n_kept, 0.2)
        assert [torch.nonzero(row).flatten().tolist() for row in ref] == layer
        assert sum(map(len, layer)) == N_KV_HEADS * n_kept and len({len(h) for h in layer}) > 1, "exact, ragged"


# ---------------------------------------------------------------------------------------------------------------
# decode-time budget (CAKE)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("budget", "n", "window", "expected"), [
    (48, 20, 32, (16, 32)),  # token budget: C = 48 even for a 20-token prompt
    (48.9, 500, 32, (16, 32)),
    (0.2, 200, 32, (8, 32)),  # fraction: C = floor(0.2 * 200) = 40
    (0.1, 200, 32, (0, 20)),  # C = 20 < window: the window is clamped to C
    (1.0, 200, 32, None),  # budget 1.0 = no compression, no decode limit
    (1, 200, 32, None),
])
def test_default_decode_budget(budget, n, window, expected):
    assert default_decode_budget(budget, n, window) == expected

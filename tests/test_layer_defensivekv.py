"""Layer-DefensiveKV: one top-k over every (layer, head, token) score, windows and forced tokens competing."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, N_KV_HEADS, N_LAYERS, load_method
from torch import nn

from kvbench.budget import GlobalFlat, LayerScores, tokens_per_head
from kvbench.engine import Engine
from kvbench.engine.context import LayerContext
from methods.defensivekv import DefensiveKV
from methods.layer_defensivekv import LayerDefensiveKV


def test_global_top_k_counts_per_layer_and_head():
    # 2 layers x 2 heads x 3 tokens, scores covering every token (window included), keep 2 -> 8 of 12 entries:
    # the top 8 are 9, 8, 7, 6, 5, 2, 1, 0.4, so layer 1 head 0 (scores 0.1-0.3) loses every token, window included.
    layers = {
        0: LayerScores(torch.tensor([[5.0, 1.0, 9.0], [2.0, 8.0, 0.0]]), 3, {}),
        1: LayerScores(torch.tensor([[0.1, 0.2, 0.3], [0.4, 7.0, 6.0]]), 3, {}),
    }
    plan = GlobalFlat().plan(layers, keep=2, n_layers=2)
    assert {i: c.tolist() for i, c in plan.items()} == {0: [3, 2], 1: [0, 3]}


def test_global_top_k_with_always_kept_tails():
    # scores over the first 2 of 3 tokens (1 always-kept tail token per head): keep 2 -> 2 x 2 x (2 - 1) = 4 picks
    layers = {
        0: LayerScores(torch.tensor([[5.0, 1.0], [2.0, 8.0]]), 3, {}),
        1: LayerScores(torch.tensor([[0.1, 0.2], [0.4, 7.0]]), 3, {}),
    }
    plan = GlobalFlat().plan(layers, keep=2, n_layers=2)
    assert {i: c.tolist() for i, c in plan.items()} == {0: [1, 2], 1: [0, 1]}  # top 4: 8, 7, 5, 2


def test_score_is_defensivekv_plus_the_window_at_the_layer_maximum():
    torch.manual_seed(0)
    hq, hkv, n, d, w = 4, 2, 40, 8, 8
    module = nn.Module()
    module.o_proj = nn.Linear(hq * d, 16, bias=False).requires_grad_(False)

    q, k, v = torch.randn(hq, n, d), torch.randn(hkv, n, d), torch.randn(hkv, n, d)

    def ctx() -> LayerContext:  # a fresh context each time (no shared memo)
        return LayerContext(layer_idx=0, n_layers=1, module=module, queries=q, keys=k, values=v,
                            positions=torch.arange(n), window=w, keep=12, scaling=d**-0.5)

    base = DefensiveKV(window=w).score(ctx())
    full = LayerDefensiveKV(window=w).score(ctx())
    assert full.shape == (hkv, n)
    torch.testing.assert_close(full[:, : n - w], base)
    assert torch.all(full[:, n - w :] == base.max())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("budget", [0.5, 0.2])
def test_model_wide_budget_is_exact_and_uneven(tiny_model, prompt, arch, budget):
    n = 200
    method, allocator = load_method("layer_defensivekv")
    with Engine(tiny_model(arch), method, allocator, budget=budget) as eng:
        eng.reset()
        eng.forward(prompt(n, seed=ARCHS.index(arch)), compress=True)
        per_layer = [int(ly.lens.sum()) for ly in eng.store.layers]
        per_layer_heads = [ly.lens.tolist() for ly in eng.store.layers]
        peak, kept = eng.store.peak_bytes, eng.store.nbytes()
    assert sum(per_layer) == N_LAYERS * N_KV_HEADS * tokens_per_head(budget, n)
    full = kept / sum(per_layer) * n * N_LAYERS * N_KV_HEADS
    assert peak == pytest.approx(full)  # the whole prompt is held until the global selection after the last layer
    assert len({tuple(ly) for ly in per_layer_heads}) > 1 or len(set(per_layer)) > 1, "uneven split expected"

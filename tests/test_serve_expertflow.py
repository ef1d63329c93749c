"""ExpertFlow: routing traces from router hooks of tiny Mixtral / Qwen2-MoE / OLMoE models, the expert cache on a
hand-made trace (LRU vs a perfect predictor), token scheduling, and the hit ratio above LRU on recorded traces."""

from __future__ import annotations

import numpy as np
import pytest
from test_serve_helpers import ctx_for

from kvbench.serve.expertflow import ExpertFlow, TablePredictor, schedule_by_route, simulate_cache
from kvbench.serve.moe import FAMILIES, record, tiny_moe, zipf_prompts


@pytest.mark.parametrize("family", FAMILIES)
def test_router_hooks_record_every_layers_choice(family: str) -> None:
    model = tiny_moe(family, layers=2, experts=8, topk=2)
    prompts = zipf_prompts(3, 10, 512, seed=0)
    trace = record(model, prompts, new_tokens=4)
    assert trace.experts.shape == (3, 13, 2, 2) and trace.ids.shape == (3, 13)
    assert (trace.ids[:, :10] == prompts.numpy()).all()
    assert (trace.experts >= 0).all() and (trace.experts < 8).all()
    assert (trace.experts[..., 0] < trace.experts[..., 1]).all()  # two distinct experts per token and layer
    # the recorded prefill choice is the router's top-k for those tokens (rerun the prompt alone)
    again = record(model, prompts, new_tokens=1)
    assert (again.experts[:, :10] == trace.experts[:, :10]).all()


def test_hand_made_trace_lru_misses_everything_a_perfect_predictor_nothing() -> None:
    needs = [[{e}] for e in (0, 1, 2, 0, 1, 2)]  # one layer, capacity 2: LRU always evicts the next one
    lru = simulate_cache(needs, capacity=2, policy="lru")
    assert (lru.hits, lru.misses) == (0, 6)
    oracle = simulate_cache(needs, capacity=2, policy="predictive", predicted=needs)
    assert (oracle.hits, oracle.misses, oracle.prefetched) == (6, 0, 6)
    lfu = simulate_cache([[{0}], [{0}], [{1}], [{2}], [{0}]], capacity=2, policy="lfu")
    assert (lfu.hits, lfu.misses) == (2, 3)  # 0 is kept: 1 is evicted for 2
    wrong = simulate_cache(needs, capacity=2, policy="predictive", predicted=[[{3}]] * 6)
    # runtime correction loads every needed expert; the useless expert 3 is evicted by every other correction
    # and prefetched again (iterations 1, 3, 5)
    assert wrong.misses == 6 and wrong.prefetched == 3


def test_token_scheduling_groups_similar_routes() -> None:
    usage = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0]], dtype=float)
    assert schedule_by_route(usage, 2) == [[0, 2], [1, 3]]


def test_expertflow_hit_ratio_above_lru_on_recorded_traces() -> None:
    _, ctx = ctx_for("system=expertflow", "workload.n_requests=16", "workload.moe.layers=4")
    ef = ExpertFlow()
    train, test = ef.traces(ctx)
    predictor = TablePredictor(train)
    acc = predictor.accuracy(test)
    assert acc > 2 / 8 + 0.1, f"predictor accuracy {acc:.2f} not above chance (0.25)"
    ours = ef.run_traces(test, predictor, ctx).metrics
    runs = {n: b.run_traces(test, predictor, ctx).metrics for n, b in ef.baselines().items()}
    assert ours["hit_ratio"] > runs["lru"]["hit_ratio"] + 0.1
    assert ours["distinct_experts_per_layer"] <= runs["predictive_no_scheduling"]["distinct_experts_per_layer"]
    assert ours["expert_mem_bytes"] == 4 * 4 * ctx.arch.expert_bytes

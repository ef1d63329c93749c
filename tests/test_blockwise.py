"""Block-wise prefill: compress after every block, so the cache stays near budget x tokens seen + one block."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM

from kvbench.budget import Uniform
from kvbench.engine import Engine
from kvbench.errors import UsageError
from kvbench.models import ASSETS
from kvbench.pipeline import prefill
from kvbench.runner import run
from methods.snapkv import SnapKV

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(ASSETS / "kvbench-tiny").eval()


def kept_positions(engine: Engine) -> list[list[list[int]]]:
    return [[layer.head(h)[2].tolist() for h in range(layer.n_heads)] for layer in engine.store.layers]


def test_one_block_equals_one_shot(model) -> None:
    ids = torch.randint(5, 700, (600,), generator=torch.Generator().manual_seed(0)).tolist()
    with Engine(model, SnapKV(), Uniform(), 0.2) as eng:
        one_shot = prefill(eng, ids, {})[0]
        ref = kept_positions(eng)
        blocked = prefill(eng, ids, {}, chunk=600)[0]
        assert kept_positions(eng) == ref and torch.equal(one_shot, blocked)


def test_blocks_bound_the_cache_and_keep_positions(model) -> None:
    n, chunk, budget = 2048, 256, 0.1
    ids = torch.randint(5, 700, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    with Engine(model, SnapKV(), Uniform(), budget) as eng:
        _, one_shot = prefill(eng, ids, {})
        _, blocked = prefill(eng, ids, {}, chunk=chunk)
        lens = eng.store.lengths()
        assert all(x == int(budget * n) for layer in lens for x in layer)  # the final cache is budget x n per head
        per_entry = blocked["kv_bytes_kept"] / blocked["kept_entries"]
        n_heads = sum(len(layer) for layer in lens)
        assert blocked["peak_kv_bytes_prefill"] <= n_heads * (int(budget * n) + chunk) * per_entry
        assert blocked["peak_kv_bytes_prefill"] < one_shot["peak_kv_bytes_prefill"] / 2
        for layer in kept_positions(eng):  # original positions, sorted, the last block's window kept
            for pos in layer:
                assert pos == sorted(pos) and pos[-32:] == list(range(n - 32, n))
        logits = eng.forward([5])  # decoding continues at the original length
        assert eng.store.next_position == n + 1 and torch.isfinite(logits).all()


def test_runner_blockwise_and_its_allocator_check(tmp_path) -> None:
    def cfg(*overrides: str):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose("config", overrides=[f"paths.results={tmp_path}", "progress=false", "limit=2",
                                                "prefill_chunk=512", *overrides])

    metrics = run(cfg("method=snapkv", "protocol=query_agnostic"))
    assert metrics["n_questions"] == 2 and abs(metrics["kept_fraction"] - 0.2) < 0.01
    metrics = run(cfg("method=adakv"))  # head-adaptive, re-compressed block by block through the ragged view
    assert abs(metrics["kept_fraction"] - 0.2) < 0.01
    with pytest.raises(UsageError, match="prefill_chunk"):
        run(cfg("prefill_chunk=0"))


# ---------------------------------------------------------------------------------------------------------------
# ragged layers re-compressed block by block (head-adaptive allocators): the left-padded view
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adakv", "defensivekv", "taskkv", "layer_defensivekv", "cake"])
def test_blockwise_head_adaptive_keeps_the_budget(model, name) -> None:
    from conftest import load_method

    n, chunk, budget = 1536, 256, 0.2
    ids = torch.randint(5, 700, (n,), generator=torch.Generator().manual_seed(2)).tolist()
    method, alloc = load_method(name)
    with Engine(model, method, alloc, budget) as eng:
        _, stats = prefill(eng, ids, {}, chunk=chunk)
        lens = eng.store.lengths()
        heads = sum(len(layer) for layer in lens)
        if not alloc.equal_heads:
            assert any(len(set(layer)) > 1 for layer in lens), "head-adaptive: heads must differ (ragged layers)"
        assert abs(stats["kept_entries"] / (heads * n) - budget) <= 0.02 * budget
        per_entry = stats["kv_bytes_kept"] / stats["kept_entries"]
        assert abs(stats["kv_bytes_kept"] - budget * n * heads * per_entry) <= 0.02 * budget * n * heads * per_entry
        for layer in eng.store.layers:  # every head keeps the last block's window, positions sorted and unique
            for h in range(layer.n_heads):
                pos = layer.head(h)[2].tolist()
                assert pos == sorted(set(pos)) and pos[-method.window :] == list(range(n - method.window, n))
        assert torch.isfinite(eng.forward([5])).all()


def test_ragged_view_scores_equal_each_head_scored_alone() -> None:
    """A ragged layer's left-padded view gives every head the SnapKV scores it gets when scored on its own."""
    from kvbench.engine.context import LayerContext
    from kvbench.engine.store import LayerKV
    from kvbench.engine.view import layer_view, mask_padding

    torch.manual_seed(0)
    lens, d, g, w = [40, 25, 33], 8, 2, 6
    layer = LayerKV.from_dense(torch.randn(3, 40, d), torch.randn(3, 40, d), torch.arange(40))
    layer.select([torch.arange(40 - x, 40) for x in lens])  # heads keep their last len_h tokens
    queries = torch.randn(3 * g, w, d)
    method = SnapKV(window=w)
    view = layer_view(layer)
    ctx = LayerContext(layer_idx=0, n_layers=1, module=None, queries=queries, keys=view.keys, values=view.values,
                       positions=view.positions, window=w, keep=10, scaling=d**-0.5, pad=view.pad)
    scores = mask_padding(method.score(ctx), view.pad)  # (3, 40 - w)
    for h, length in enumerate(lens):
        k, v, p = layer.head(h)
        alone = LayerContext(layer_idx=0, n_layers=1, module=None, queries=queries[h * g : (h + 1) * g],
                             keys=k[None], values=v[None], positions=p, window=w, keep=10, scaling=d**-0.5)
        ref = method.score(alone)[0]  # (len_h - w,)
        torch.testing.assert_close(scores[h, 40 - length :], ref, atol=1e-6, rtol=0)
        assert torch.isinf(scores[h, : 40 - length]).all()

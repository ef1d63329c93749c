"""``cache: query_head``: one cache per query head (KVCache-Factory / AdaKV-repo default), with G x the bytes."""

from __future__ import annotations

import pytest
import torch
from conftest import HEAD_DIM, N_HEADS, N_KV_HEADS, N_LAYERS, load_method

from kvbench.engine import Engine
from kvbench.errors import UsageError
from kvbench.pipeline import cache_stats

N = 200
G = N_HEADS // N_KV_HEADS


def prefill(model, name: str, budget: float, cache: str):
    method, allocator = load_method(name, (f"method.cache={cache}",))
    ids = torch.randint(0, 128, (N,), generator=torch.Generator().manual_seed(3))
    with Engine(model, method, allocator, budget=budget) as eng:
        eng.reset()
        logits = eng.forward(ids, compress=True)
        stats = cache_stats(eng, N)
        heads = [[layer.head(h)[2].tolist() for h in range(layer.n_heads)] for layer in eng.store.layers]
        step = eng.forward([int(logits.argmax())])
    return logits, step, stats, heads


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_uncompressed_query_head_cache_gives_the_same_outputs(tiny_model, arch) -> None:
    model = tiny_model(arch)
    a = prefill(model, "snapkv", 1.0, "kv_head")
    b = prefill(model, "snapkv", 1.0, "query_head")
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)
    assert b[2]["kv_bytes_kept"] == G * a[2]["kv_bytes_kept"], "query_head stores every KV head G times"


@pytest.mark.parametrize("name", ["snapkv", "adakv"])
def test_query_head_selection_and_honest_bytes(tiny_model, name: str) -> None:
    logits, _, stats, heads = prefill(tiny_model("llama"), name, 0.5, "query_head")
    assert all(len(layer) == N_HEADS for layer in heads) and len(heads) == N_LAYERS
    full = N_LAYERS * N_KV_HEADS * N * HEAD_DIM * 4 * 2
    assert stats["kv_bytes_full"] == full  # the reference is the real (unexpanded) full cache
    assert stats["kv_bytes_kept"] == pytest.approx(G * 0.5 * full, rel=0.03)
    assert stats["kept_fraction"] == pytest.approx(0.5, abs=0.02)
    # the G query heads of one KV head choose their own tokens
    assert any(layer[2 * k] != layer[2 * k + 1] for layer in heads for k in range(N_KV_HEADS))


def test_unknown_cache_mode_is_rejected() -> None:
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException) as err:
        load_method("snapkv", ("method.cache=per_token",))
    assert isinstance(err.value.__cause__, UsageError) and "cache=" in str(err.value.__cause__)

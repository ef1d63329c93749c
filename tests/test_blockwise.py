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
    with pytest.raises(UsageError, match="prefill_chunk"):
        run(cfg("method=adakv"))
    with pytest.raises(UsageError, match="prefill_chunk"):
        run(cfg("prefill_chunk=0"))

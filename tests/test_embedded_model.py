"""Tests of the embedded kvbench-tiny model: loading, deterministic build, and real in-context retrieval."""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaForCausalLM, PreTrainedTokenizerFast

from kvbench.embedded import DEFAULT_DIR, save_embedded_model
from kvbench.tasks import synthetic as syn
from kvbench.tasks.base import Sample

ASSET_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "README.md")  # fmt: skip


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(DEFAULT_DIR)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(DEFAULT_DIR).eval()


def prompt_ids(tok: PreTrainedTokenizerFast, context: str, question: str) -> list[int]:
    """The harness's prompt: context with <s>, then the question without specials."""
    return tok(context, add_special_tokens=True).input_ids + tok(question, add_special_tokens=False).input_ids


@torch.no_grad()
def greedy_answer(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, ids: list[int]) -> str:
    """Greedy decoding for MAX_NEW_TOKENS tokens, decoded and cut at the stop word."""
    x = torch.tensor([ids])  # [1, T]
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=syn.MAX_NEW_TOKENS, do_sample=False)
    return syn.cut_at_stop(tok.decode(out[0, len(ids) :], skip_special_tokens=True))


def accuracy(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, samples: list[Sample]) -> float:
    hits = [greedy_answer(model, tok, prompt_ids(tok, s.context, q.text)) in q.answers
            for s in samples for q in s.questions]  # fmt: skip
    return sum(hits) / len(hits)


def test_assets_load(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> None:
    for name in ASSET_FILES:
        assert (DEFAULT_DIR / name).is_file(), name
    assert (DEFAULT_DIR / "model.safetensors").stat().st_size < 8 * 2**20
    cfg = model.config
    assert isinstance(model, LlamaForCausalLM) and isinstance(tok, PreTrainedTokenizerFast)
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.vocab_size == len(tok) and model.dtype == torch.float32
    ids = tok("the code of alice k17 .", add_special_tokens=True).input_ids
    assert ids[0] == tok.bos_token_id == 1 and tok.pad_token_id == 0 and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "the code of alice k17 ."
    assert tok("question : alice", add_special_tokens=False).input_ids[0] != tok.bos_token_id


def test_builder_is_deterministic(tmp_path: Path) -> None:
    out = save_embedded_model(tmp_path / "tiny", seed=0)
    for name in ("model.safetensors", "tokenizer.json"):
        assert _sha256(out / name) == _sha256(DEFAULT_DIR / name), name
    shipped = json.loads((DEFAULT_DIR / "config.json").read_text())
    if shipped["transformers_version"] == transformers.__version__:  # config.json records the writing version
        assert _sha256(out / "config.json") == _sha256(DEFAULT_DIR / "config.json")


def test_prompt_concatenation_is_plain(tok: PreTrainedTokenizerFast) -> None:
    s = syn.make_samples("multikey", 1, [512], seed=1)[0]
    q = s.questions[0].text
    assert prompt_ids(tok, s.context, q) == tok(f"{s.context} {q}").input_ids


@pytest.mark.parametrize(("length", "n"), [(512, 8), (1024, 6), (2048, 4)])
def test_full_cache_retrieval(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, length: int, n: int) -> None:
    samples = syn.make_samples("multikey", n, [length], seed=11)
    assert accuracy(model, tok, samples) >= 0.9


def test_multiquery_and_needle_retrieval(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> None:
    assert accuracy(model, tok, syn.make_samples("multiquery", 2, [1024], seed=2, n_questions=3)) >= 0.9
    assert accuracy(model, tok, syn.make_samples("needle", 1, [512], seed=2, depths=[0.0, 0.3, 0.7, 1.0])) >= 0.9


def test_random_model_does_not_retrieve(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        random_model = LlamaForCausalLM(model.config).eval()
    assert accuracy(random_model, tok, syn.make_samples("multikey", 6, [512], seed=11)) <= 0.1


@torch.no_grad()
def test_evicting_the_middle_breaks_retrieval(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> None:
    """StreamingLLM-like crude eviction (first 4 + last 20 % of the context) loses mid-context needles."""
    s = syn.make_samples("needle", 1, [512], seed=3, depths=[0.5])[0]
    ctx = tok(s.context).input_ids
    q = tok(s.questions[0].text, add_special_tokens=False).input_ids
    assert greedy_answer(model, tok, ctx + q) in s.questions[0].answers
    cache = DynamicCache()
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    model(torch.tensor([ctx]), use_cache=True, **{cache_kw: cache})
    keep = torch.tensor(list(range(4)) + list(range(len(ctx) - len(ctx) // 5, len(ctx))))  # [K]
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]  # [1, Hkv, K, D]
    positions = torch.arange(len(ctx), len(ctx) + len(q))[None]  # [1, Q]: original positions, not cache slots
    out = model(torch.tensor([q]), position_ids=positions, use_cache=True, **{cache_kw: cache})
    first = tok.convert_ids_to_tokens(int(out.logits[0, -1].argmax()))
    assert first != s.questions[0].answers[0].split()[0]

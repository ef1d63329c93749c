"""The Python API: transformers' generate() under kvbench.compress against the engine's own decode loop, and
kvbench.answer against the CLI's predictions; the registry of methods and allocators; one error per bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_families import WINDOW, gemma3
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
)

import kvbench
from kvbench.api import components
from kvbench.engine import Engine
from kvbench.errors import UsageError
from kvbench.models import load_model
from kvbench.registry import compose_config
from kvbench.runner import run
from kvbench.tasks import load_samples

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 96  # tokens of the tiny random models' prompts
# methods x allocators that exercise the engine's paths: uniform, ragged heads (flat), a layer schedule,
# cross-layer cascading with decode-time eviction (cake), a fixed window, accumulated attention
GENERATE_METHODS = {"snapkv": {"window": 8}, "defensivekv": {"window": 8}, "pyramidkv": {"window": 8},
                    "cake": {"window": 8}, "streamingllm": {"n_sink": 4}, "h2o": {"window": 8}}


@pytest.fixture(scope="module")
def embedded():
    """The embedded kvbench-tiny model and tokenizer, and one sample of its default task."""
    model, tok = load_model(OmegaConf.load(ROOT / "conf/model/kvbench-tiny.yaml"), torch.device("cpu"))
    sample = load_samples(compose_config(["task=synth_multikey_dense"]).task, 1)[0]
    return model, tok, sample


def engine_tokens(model, method: str, budget: float, ids: torch.Tensor, n: int, **params):
    """Greedy tokens of the engine's own loop (Engine.generate), and the store's bytes and lengths after it."""
    m, a, _ = components(method, budget, None, params)
    with Engine(model, m, a, budget) as eng:
        eng.reset()
        tokens, _ = eng.generate(eng.forward(ids, compress=True), n)
        return tokens, eng.store.nbytes(), eng.store.allocated_bytes(), eng.store.lengths()


@pytest.mark.parametrize("method", GENERATE_METHODS)
def test_greedy_generate_equals_the_engine_loop_tokens_and_bytes(tiny_model, prompt, one_thread, method) -> None:
    model, ids, params = tiny_model("llama"), prompt(PROMPT), GENERATE_METHODS[method]
    expected, nbytes, allocated, lengths = engine_tokens(model, method, 0.3, ids, 12, **params)
    with kvbench.compress(model, method, budget=0.3, **params) as kv:
        out = model.generate(ids[None], max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert out[0, PROMPT:].tolist() == expected
        store = kv.cache.store
        assert (store.nbytes(), store.allocated_bytes(), store.lengths()) == (nbytes, allocated, lengths)
        assert store.next_position == PROMPT + 11  # logical length: every token fed, evicted or not
        assert kv.cache.get_seq_length() == PROMPT + 11 > max(map(max, lengths))
        assert kv.prefill["kept_fraction"] == pytest.approx(0.3, abs=0.02)  # the compressed bytes are held
        assert kv.prefill["kv_bytes_kept"] < 0.35 * kv.prefill["kv_bytes_full"]
    assert "generate" not in vars(model) and model.config._attn_implementation == "eager"


def test_full_budget_gives_plain_generate_logits(tiny_model, prompt, one_thread) -> None:
    """Budget 1.0 keeps everything: generate over kvbench's cache equals transformers' own cache step by step."""
    model, ids = tiny_model("qwen3"), prompt(PROMPT, seed=1)
    kw = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "output_logits": True,
          "return_dict_in_generate": True}
    plain = model.generate(ids[None], **kw)
    with kvbench.compress(model, "snapkv", budget=1.0, backend="eager"):
        ours = model.generate(ids[None], **kw)
    assert torch.equal(ours.sequences, plain.sequences)
    for a, b in zip(ours.logits, plain.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gemma3_local_layers_under_generate(one_thread) -> None:
    """Gemma-3's sliding-window layers keep their window under generate as in the engine's loop; budget 1.0 gives
    transformers' own tokens."""
    model, ids = gemma3(), torch.randint(0, 128, (PROMPT,), generator=torch.Generator().manual_seed(0))
    expected, nbytes, _, lengths = engine_tokens(model, "snapkv", 0.3, ids, 12, window=8)
    with kvbench.compress(model, "snapkv", budget=0.3, window=8) as kv:
        out = model.generate(ids[None], max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert out[0, PROMPT:].tolist() == expected
        assert (kv.cache.store.nbytes(), kv.cache.store.lengths()) == (nbytes, lengths)
        assert lengths[0] == [WINDOW, WINDOW] and lengths[-1][0] < PROMPT // 2  # a local layer, the global one
    plain = model.generate(ids[None], max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with kvbench.compress(model, "snapkv", budget=1.0):
        assert torch.equal(model.generate(ids[None], max_new_tokens=12, min_new_tokens=12, do_sample=False), plain)


def test_positions_stay_logical_after_eviction(tiny_model, prompt, one_thread) -> None:
    """After eviction the kept tokens keep their positions and the new ones continue from the logical length."""
    model, ids = tiny_model("llama"), prompt(PROMPT)
    with kvbench.compress(model, "snapkv", budget=0.25, window=8) as kv:
        model.generate(ids[None], max_new_tokens=6, min_new_tokens=6, do_sample=False)
        positions = kv.cache.store.layers[0].head(0)[2]
    assert positions[-5:].tolist() == list(range(PROMPT, PROMPT + 5))  # the decoded tokens, never shifted
    assert positions[-13:-5].tolist() == list(range(PROMPT - 8, PROMPT))  # the window
    assert len(positions) < PROMPT // 2


def test_sampling_with_a_seed_is_reproducible(tiny_model, prompt, one_thread) -> None:
    model, ids = tiny_model("llama"), prompt(PROMPT)
    runs = []
    with kvbench.compress(model, "snapkv", budget=0.3, window=8):
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            out = model.generate(ids[None], max_new_tokens=16, min_new_tokens=16, do_sample=True, temperature=1.5,
                                 top_k=0, top_p=1.0)
            runs.append(out[0, PROMPT:].tolist())
    assert runs[0] == runs[1] and runs[0] != runs[2]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over the tiny random models' 128 ids (printable ASCII, then ``<tN>``), which
    transformers' StopStringCriteria can read (the embedded model's word-level vocabulary cannot be)."""
    vocab = {chr(32 + i): i for i in range(95)} | {f"<t{i}>": i for i in range(95, 128)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<t127>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<t127>")


def test_stop_strings_stop_at_their_first_occurrence(tiny_model, prompt, one_thread) -> None:
    model, ids, tok = tiny_model("llama"), prompt(PROMPT), char_tokenizer()
    with kvbench.compress(model, "snapkv", budget=0.3, window=8):
        full = model.generate(ids[None], max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, PROMPT:].tolist()
        stop = tok.decode(full[4:6])
        first = next(j for j in range(16) if stop in tok.decode(full[: j + 1]))
        stopped = model.generate(ids[None], max_new_tokens=16, do_sample=False, stop_strings=[stop], tokenizer=tok)
    assert first < 15 and stopped[0, PROMPT:].tolist() == full[: first + 1]


def test_streamer_stopping_criteria_and_max_new_tokens(embedded, one_thread) -> None:
    """On the embedded model the answer is 'k.. k.. k.. .': a streamer, a StoppingCriteria, max_new_tokens."""
    model, tok, sample = embedded
    enc = tok(sample.context + sample.questions[0].text, return_tensors="pt")
    inputs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}  # 4.57 refuses token_type_ids
    n = enc.input_ids.shape[1]

    class Collect(TextStreamer):
        text = ""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            Collect.text += text

    class AfterTwo(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - n >= 2, dtype=torch.bool)

    with kvbench.compress(model, "defensivekv", budget=0.2) as kv:
        full = model.generate(**inputs, max_new_tokens=12, do_sample=False, streamer=Collect(tok, skip_prompt=True))
        streamer = TextIteratorStreamer(tok, skip_prompt=True)
        thread = threading.Thread(target=model.generate, kwargs={**inputs, "max_new_tokens": 12, "do_sample": False,
                                                                 "streamer": streamer})
        thread.start()
        streamed = "".join(streamer)
        thread.join()
        two = model.generate(**inputs, max_new_tokens=12, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([AfterTwo()]))
        assert kv.prefill["kept_fraction"] == pytest.approx(0.2, abs=0.01)
    answer = sample.questions[0].answers[0]
    assert full.shape[1] == n + 12 and tok.decode(full[0, n:]).startswith(answer + " .")
    assert Collect.text.strip() == streamed.strip() == tok.decode(full[0, n:], skip_special_tokens=True).strip()
    assert two.shape[1] == n + 2 and two[0, n:].tolist() == full[0, n : n + 2].tolist()


def test_a_returned_cache_continues_over_the_compressed_context(tiny_model, prompt, one_thread) -> None:
    model, ids = tiny_model("llama"), prompt(PROMPT)
    with kvbench.compress(model, "snapkv", budget=0.3, window=8) as kv:
        first = model.generate(ids[None], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        cache, kept = kv.cache, kv.cache.store.n_entries()
        more = torch.cat([first, prompt(5, seed=3)[None]], 1)
        second = model.generate(more, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                **{cache_key(model): cache})
        assert kv.cache is cache and cache.get_seq_length() == more.shape[1] + 3
        assert cache.store.n_entries() == kept + (1 + 5 + 3) * 2 * 2  # appended uncompressed: 2 layers x 2 heads
        assert second[0, : more.shape[1]].tolist() == more[0].tolist()
        model.generate(ids[None], max_new_tokens=2, do_sample=False)  # a new call: a fresh cache
        with pytest.raises(UsageError, match="earlier generate"):
            model.generate(more, max_new_tokens=2, **{cache_key(model): cache})


def cache_key(model) -> str:
    from kvbench.engine.hfcache import cache_kwarg

    return cache_kwarg(model)


def test_refusals_are_one_clear_error_each(tiny_model, prompt, one_thread) -> None:
    model, ids = tiny_model("llama"), prompt(PROMPT)
    with kvbench.compress(model, "snapkv", budget=0.3, window=8):
        with pytest.raises(UsageError, match="batch size 1"):
            model.generate(torch.stack([ids, ids]), max_new_tokens=2)
        with pytest.raises(UsageError, match="batch size 1"):
            model.generate(ids[None], max_new_tokens=2, num_beams=2)
        with pytest.raises(UsageError, match="padding"):
            model.generate(ids[None], attention_mask=torch.cat([torch.zeros(1, 3), torch.ones(1, PROMPT - 3)], 1)
                           .long(), max_new_tokens=2)
        with pytest.raises(UsageError, match="use_cache=False"):
            model.generate(ids[None], max_new_tokens=2, use_cache=False)
        with pytest.raises(UsageError, match="prefill_chunk_size"):
            model.generate(ids[None], max_new_tokens=2, prefill_chunk_size=32)
        with pytest.raises(UsageError, match="call model.generate"):
            model(ids[None])
    with pytest.raises(UsageError, match="unknown method 'snapk'; available: adakv"):
        kvbench.compress(model, "snapk").__enter__()
    with pytest.raises(UsageError, match="no parameter 'windw'; its parameters: window, kernel"):
        kvbench.compress(model, "snapkv", windw=8).__enter__()
    with pytest.raises(UsageError, match="kernel must be odd"):
        kvbench.compress(model, "snapkv", kernel=4).__enter__()
    with pytest.raises(UsageError, match="budget must be > 0"):
        kvbench.compress(model, "snapkv", budget=0).__enter__()
    with pytest.raises(UsageError, match="several caches per context"):
        kvbench.compress(model, "epicache").__enter__()
    with pytest.raises(UsageError, match="runs on var models"):
        kvbench.compress(model, "hack").__enter__()
    assert "generate" not in vars(model) and model.config._attn_implementation == "eager"
    model.generate(ids[None], max_new_tokens=2)  # the model works as before


def test_instances_and_classes_from_the_registry(tiny_model, prompt, one_thread) -> None:
    model, ids = tiny_model("llama"), prompt(PROMPT)
    method = kvbench.methods.SnapKV(window=8, kernel=5)
    assert isinstance(method, kvbench.methods.get("snapkv"))
    expected = engine_tokens(model, "snapkv", 0.3, ids, 6, window=8, kernel=5)[0]
    with kvbench.compress(model, method, budget=0.3, allocator=kvbench.allocators.Uniform()):
        assert model.generate(ids[None], max_new_tokens=6, min_new_tokens=6)[0, PROMPT:].tolist() == expected
    defensive = components(kvbench.methods.DefensiveKV(window=8), 0.3)[1]  # the option's allocator: flat
    assert (type(defensive), defensive.name) == (kvbench.allocators.HeadAdaptive, "flat")
    with pytest.raises(UsageError, match="set them on it"):
        components(method, 0.3, params={"window": 4})


def test_registry_names_classes_params_and_descriptions() -> None:
    assert kvbench.methods.names() == sorted(p.stem for p in (ROOT / "conf/method").glob("*.yaml"))
    assert kvbench.allocators.names() == sorted(p.stem for p in (ROOT / "conf/allocator").glob("*.yaml"))
    from kvbench.budget import HeadAdaptive
    from methods.cake import CAKE
    from methods.snapkv import SnapKV

    assert kvbench.methods.SnapKV is SnapKV and kvbench.methods.get("cake_nocascade") is CAKE
    assert kvbench.allocators.HeadAdaptive is HeadAdaptive and kvbench.allocators.get("flat") is HeadAdaptive
    assert kvbench.methods.params("adakv") == {"window": 32, "kernel": 7, "pooling": "max", "reduce": "mean",
                                              "gqa": "mean", "cache": "kv_head"}  # inherited from snapkv.yaml
    assert kvbench.methods.build("cake_nocascade").cascading is False
    assert kvbench.allocators.build("pyramid", beta=10).beta == 10
    text = kvbench.methods.describe("snapkv")
    assert "methods.snapkv.SnapKV" in text and "Parameters:" in text and "kernel: 7" in text
    with pytest.raises(AttributeError, match="no method class 'Snap'"):
        _ = kvbench.methods.Snap
    with pytest.raises(UsageError, match="unknown allocator 'pyramidd'"):
        kvbench.allocators.params("pyramidd")


def test_import_kvbench_and_the_registry_import_no_torch() -> None:
    code = ("import sys, kvbench, kvbench.methods; kvbench.methods.names(); kvbench.allocators.names(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("method", "protocol"), [("snapkv", "query_aware"), ("defensivekv", "query_agnostic")])
def test_answer_equals_the_cli_predictions(tmp_path, embedded, one_thread, method, protocol) -> None:
    model, tok, _ = embedded
    cfg = compose_config([f"method={method}", "budget=0.2", f"protocol={protocol}", "limit=2", "progress=false",
                          f"paths.results={tmp_path}"])
    run(cfg)
    records = [json.loads(x) for x in (Path(cfg.run_dir) / "predictions.jsonl").read_text().splitlines()]
    samples = load_samples(cfg.task, 2)
    got = [a for s in samples for a in kvbench.answer(model, tok, s, method=method, budget=0.2, protocol=protocol,
                                                      task="synth_multikey_dense")]
    assert [a.prediction for a in got] == [r["prediction"] for r in records]
    assert [a.record for a in got] == [{**r, **timings(a.record)} for a, r in zip(got, records, strict=True)]
    as_text = [a for s in samples for a in kvbench.answer(model, tok, s.context, [q.text for q in s.questions],
                                                          method=method, budget=0.2, protocol=protocol,
                                                          task="synth_multikey_dense")]
    assert [a.prediction for a in as_text] == [r["prediction"] for r in records]
    for a, r in zip(got, records, strict=True):
        assert (a.kept_fraction, a.kv_bytes, a.kv_bytes_full) == (r["kept_fraction"], r["kv_bytes_kept"],
                                                                   r["kv_bytes_full"])
        assert a.record["prompt_hash"] == r["prompt_hash"] and a.record["scores"] == r["scores"]
        assert a.prefill_s > 0 and a.compress_s > 0 and (a.decode_s_per_token is None) == (r["new_tokens"] == 1)


def timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.endswith("_s") or k.endswith("_s_per_token")}


def test_answer_without_a_task_decodes_greedily_and_takes_strings(embedded, one_thread) -> None:
    model, tok, sample = embedded
    q = sample.questions[0]
    out = kvbench.answer(model, tok, sample.context, [q.text, q.text], method="snapkv", budget=0.2,
                         max_new_tokens=8, stop=["."])
    assert [a.prediction for a in out] == [q.answers[0]] * 2 and out[0].new_tokens <= 8
    assert out[0].kept_fraction == pytest.approx(0.2, abs=0.01) and out[0].kv_bytes < 0.21 * out[0].kv_bytes_full
    with pytest.raises(UsageError, match="protocol='both'"):
        kvbench.answer(model, tok, sample.context, q.text, protocol="both")
    with pytest.raises(UsageError, match="at least one question"):
        kvbench.answer(model, tok, sample.context, [])

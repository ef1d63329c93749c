"""The Python API: ``kvbench.compress`` (transformers' ``generate`` under a method) and ``kvbench.answer``.

Both build the method and allocator through the CLI's own configs (:mod:`kvbench.registry`: ``conf/method``,
``conf/allocator``, Hydra's composition, ``kvbench.runner.build``), check them with the CLI's checks
(``check_budget``, ``check_compatible``, the engine's ``check_model``) and run the one engine
(:class:`kvbench.engine.Engine`); nothing here compresses or attends by itself.

* ``with kvbench.compress(model, "snapkv", budget=0.2, window=8) as kv: model.generate(**inputs)``: generate runs
  over a :class:`~kvbench.engine.hfcache.KVBenchCache`; the prompt is compressed per layer on its first forward
  (the CLI's query-aware prefill), decoding attends over the compressed cache. Greedy, sampling, stopping
  criteria and stop strings, streamers and ``max_new_tokens`` are generate's own.
* ``kvbench.answer(model, tok, context, questions, method=..., budget=..., protocol=...)``: the CLI's protocols
  (:mod:`kvbench.protocols`) over one context; a :class:`Answer` per question with the cache statistics.
* ``kvbench.load("kvbench-tiny")``: a model and tokenizer as ``model=<option>`` loads them (the CLI's loader).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kvbench import protocols
from kvbench.budget import Allocator
from kvbench.cli import CONF_DIR
from kvbench.compat import check_compatible
from kvbench.engine import Engine
from kvbench.engine.hfcache import GenerateBinding, KVBenchCache
from kvbench.errors import UsageError
from kvbench.method import Method
from kvbench.methods import REGISTRY
from kvbench.models import load_model, pick_device
from kvbench.pipeline import RunOptions, cache_stats
from kvbench.registry import compose_config, set_params
from kvbench.runner import build, build_method, run_options
from kvbench.tasks.base import Question, Sample
from kvbench.validate import check_budget


def components(method: str | Method, budget: float, allocator: str | Allocator | None = None,
               params: dict[str, Any] | None = None, overrides: Sequence[str] = ()) -> tuple[Method, Allocator, Any]:
    """The method, allocator and composed config of ``method=<name> [allocator=<name>] budget=<b>`` (the CLI's
    defaults: a method's yaml may choose its allocator), ``params`` set on the method node; instances given are
    used as they are (a method instance whose ``name`` is an option gets that option's default allocator)."""
    check_budget(budget)
    named = isinstance(method, str)
    if not named and params:
        raise UsageError(f"parameters {sorted(params)} given with a {type(method).__name__} instance; set them on it")
    name = method if named else method.name  # an instance of a known option gets that option's allocator
    opts = [f"method={name}"] if named or name in REGISTRY.names() else []
    opts += [f"allocator={allocator}"] if isinstance(allocator, str) else []
    cfg = compose_config([*opts, f"budget={budget}", *overrides])
    if named:
        set_params(cfg, "method", params or {})
    if named and not isinstance(allocator, Allocator):
        return (*build_method(cfg), cfg)  # the runner's own: built, then checked with the protocol and the model
    m = build(cfg.method, "method") if named else method
    a = allocator if isinstance(allocator, Allocator) else build(cfg.allocator, "allocator")
    check_compatible(m, a, str(cfg.protocol), None)
    return m, a, cfg


def load(model: str = "kvbench-tiny", device: str = "auto", **params: Any) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A model and its tokenizer as ``python -m kvbench model=<model>`` loads them: a ``conf/model`` option
    (``kvbench-tiny``, ``smollm2-135m-instruct``, ...) or a hub id / local directory (``model=hf``); ``params``
    set the model node's keys (``dtype="bfloat16"``, ``attn_implementation="eager"``, ...)."""
    known = (CONF_DIR / "model" / f"{model}.yaml").is_file()
    cfg = compose_config([f"model={model}" if known else "model=hf", f"device={device}"])
    if not known:
        params = {"pretrained": model, **params}
    set_params(cfg, "model", params)
    return load_model(cfg.model, pick_device(str(cfg.device)))


@dataclass
class Compressed:
    """What ``kvbench.compress`` yields: the engine and the cache of the newest ``generate`` call.

    Attributes:
        engine: the :class:`~kvbench.engine.Engine` (method, allocator, budget, ``store``).
        prefill: the cache statistics right after the newest prompt was compressed (as the CLI records them:
            kept_fraction, kv_bytes_kept, kv_bytes_full, ..., prefill_s, compress_s), or empty before any.
        decode_s: seconds of every decode forward of the newest ``generate`` call.
    """

    engine: Engine
    binding: GenerateBinding
    prefill: dict[str, Any] = field(default_factory=dict)
    decode_s: list[float] = field(default_factory=list)

    @property
    def cache(self) -> KVBenchCache | None:
        """The newest ``KVBenchCache`` (``cache.store`` holds the compressed keys and values)."""
        return self.binding.cache

    def new_cache(self) -> KVBenchCache:
        """A fresh cache, to pass to ``generate`` (or the model) explicitly."""
        return self.binding.new_cache()

    def stats(self) -> dict[str, Any]:
        """The statistics after the prompt, plus the cache now: tokens seen, bytes kept and allocated, peak."""
        store = self.engine.store
        return {**self.prefill, "tokens_seen": store.next_position, "kv_bytes_now": store.nbytes(),
                "kv_bytes_allocated": store.allocated_bytes(), "peak_kv_bytes": store.peak_bytes,
                "decode_s_per_token": sum(self.decode_s) / len(self.decode_s) if self.decode_s else None}


@contextlib.contextmanager
def compress(model: nn.Module, method: str | Method = "snapkv", budget: float = 0.2, *,
             allocator: str | Allocator | None = None, backend: str = "sdpa", **params: Any) -> Iterator[Compressed]:
    """Run ``model.generate`` (and forwards given the yielded cache) over kvbench's compressed KV cache.

    Args:
        model: a loaded causal LM of a family the engine has an adapter for (Llama, Mistral, Qwen2/3, Gemma-3).
        method: a ``conf/method`` option (``kvbench.methods.names()``) or a :class:`~kvbench.method.Method`.
        budget: <= 1: fraction of KV entries kept; > 1: average tokens kept per KV head (window included).
        allocator: a ``conf/allocator`` option or an :class:`~kvbench.budget.Allocator` (default: the method's).
        backend: the engine's attention kernels (``sdpa`` | ``eager`` | ``flash_attention_2``).
        **params: the method's parameters (``kvbench.methods.params(name)``), e.g. ``window=8``.

    The first forward over a fresh cache (the prompt) is compressed per layer, as the CLI's query-aware prefill;
    one sequence at a time (batch size 1, no beam search). Methods with several caches per context (EpiCache) are
    refused here; ``kvbench.answer`` runs them.
    """
    m, a, _ = components(method, budget, allocator, params)
    check_compatible(m, a, "query_aware", None, episodic_supported=False)
    m.prepare(model)
    with Engine(model, m, a, float(budget), backend=backend) as engine:
        binding = GenerateBinding(model, engine)
        handle = Compressed(engine, binding)
        binding.on_step = lambda n, prompt, seconds: record_step(handle, n, prompt, seconds)
        with binding:
            yield handle


def record_step(handle: Compressed, n: int, prompt: bool, seconds: float) -> None:
    """After every forward of a bound generate: the prompt's cache statistics, or one more decode time."""
    if prompt:
        handle.prefill = {**cache_stats(handle.engine, n), "prefill_s": seconds - handle.engine.compress_seconds,
                          "compress_s": handle.engine.compress_seconds}
        handle.decode_s = []
    else:
        handle.decode_s.append(seconds)


@dataclass
class Answer:
    """One question's answer and the cache it was answered over (the CLI's prediction record, in ``record``).

    Attributes:
        question, prediction (post-processed as the task says), raw_prediction, new_tokens.
        kept_fraction: kept KV entries / entries of the full cache of the compressed tokens.
        kv_bytes, kv_bytes_full, peak_kv_bytes: bytes kept after compression, of the full cache, at peak.
        prefill_s, compress_s, decode_s_per_token: seconds (prefill without compression).
        record: everything ``python -m kvbench`` writes to predictions.jsonl for this question.
    """

    question: str
    prediction: str
    raw_prediction: str
    new_tokens: int
    kept_fraction: float
    kv_bytes: int
    kv_bytes_full: int
    peak_kv_bytes: int
    prefill_s: float
    compress_s: float
    decode_s_per_token: float | None
    record: dict[str, Any]

    @classmethod
    def from_record(cls, text: str, r: dict[str, Any]) -> Answer:
        return cls(text, r["prediction"], r["raw_prediction"], r["new_tokens"], r["kept_fraction"],
                   r["kv_bytes_kept"], r["kv_bytes_full"], r["peak_kv_bytes"], r["prefill_s"], r["compress_s"],
                   r["decode_s_per_token"], r)


def answer(model: nn.Module, tokenizer: PreTrainedTokenizerBase, context: str | Sample,
           questions: str | Question | Sequence[str | Question] | None = None, method: str | Method = "snapkv",
           budget: float = 0.2, protocol: str = "query_aware", *, allocator: str | Allocator | None = None,
           task: str | None = None, max_new_tokens: int | None = None, stop: Sequence[str] | None = None,
           chat: bool | None = None, overrides: Sequence[str] = (), backend: str = "sdpa", seed: int = 0,
           **params: Any) -> list[Answer]:
    """Answer ``questions`` about ``context`` under a method and budget, as ``python -m kvbench`` would.

    ``context``: the text, or a task's :class:`~kvbench.tasks.base.Sample` as it is (its ``meta``, e.g. a
    conversation's turns for EpiCache, and with ``questions=None`` its questions).
    ``protocol``: ``query_aware`` (context + question compressed together, per question) or ``query_agnostic``
    (the context compressed once, every question appended over it), the CLI's protocol functions. Prompting and
    decoding options are a task's (``task=<conf/task option>``: its max_new_tokens, stop strings, post-processing
    and tokenization, with ``overrides`` such as ``model=<option>`` for the model keys: chat template, max_length),
    else greedy decoding of ``max_new_tokens`` (64) cut at ``stop``; ``max_new_tokens``, ``stop`` and ``chat``
    given here win; questions without reference answers are not scored (``record["scores"]`` is empty).
    ``**params``: the method's parameters. Returns one :class:`Answer` per question, in order.
    """
    opts_over = [f"task={task}"] if task else []
    m, a, cfg = components(method, budget, allocator, params, [*opts_over, f"protocol={protocol}", *overrides])
    m.prepare(model)
    sample = as_sample(context, questions)
    opts = options(cfg, model, task is not None, max_new_tokens, stop, chat)
    if not all(q.answers for q in sample.questions):  # nothing to score against: predictions and statistics only
        opts = dataclasses.replace(opts, metrics=[])
    run = protocols.get(protocols.protocol_name(protocol, m.episodic))
    torch.manual_seed(seed)
    with Engine(model, m, a, float(budget), backend=backend) as engine:
        records = list(run(engine, tokenizer, sample, sample.questions, opts))
    return [Answer.from_record(q.text, r) for q, r in zip(sample.questions, records, strict=True)]


# ``answer`` without a task: greedy up to 64 tokens, no stop string, no chat template, no truncation, no metric
PLAIN = {"max_new_tokens": 64, "stop": [], "metrics": [], "chat": False, "eos_strings": [], "postprocess": ["strip"],
         "min_new_tokens": 0, "tokenize": "separate", "truncation": "context", "max_length": None}


def options(cfg: Any, model: nn.Module, from_task: bool, max_new_tokens: int | None, stop: Sequence[str] | None,
            chat: bool | None) -> RunOptions:
    """The run options of ``answer``: the task's (``kvbench.runner.run_options``, as the CLI) or plain greedy."""
    opts = run_options(cfg, model)  # the model's end-of-sequence ids; the task's options when from_task
    if not from_task:
        opts = dataclasses.replace(opts, **PLAIN)
    given = {"max_new_tokens": max_new_tokens, "stop": None if stop is None else list(stop), "chat": chat}
    return dataclasses.replace(opts, **{k: v for k, v in given.items() if v is not None})


def as_sample(context: str | Sample, questions: str | Question | Sequence[str | Question] | None) -> Sample:
    """The sample ``answer`` runs: a task's Sample (with other questions if given), or a text and its questions."""
    if isinstance(context, Sample):
        return context if questions is None else dataclasses.replace(context, questions=as_questions(questions))
    if questions is None:
        raise UsageError("kvbench.answer needs questions about a context given as text")
    return Sample("api", context, as_questions(questions))


def as_questions(questions: str | Question | Sequence[str | Question]) -> list[Question]:
    """Question objects (ids q0, q1, ...) from strings or Questions; at least one."""
    items = [questions] if isinstance(questions, str | Question) else list(questions)
    if not items:
        raise UsageError("kvbench.answer needs at least one question")
    return [q if isinstance(q, Question) else Question(f"q{i}", str(q), []) for i, q in enumerate(items)]


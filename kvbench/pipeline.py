"""The shared leaf of every protocol: prompt encoding, prefill + compression, answers, records.

The protocols themselves are registered in :mod:`kvbench.protocols` (this module imports none of them); the two
defined here are generators that yield each question's record as soon as it is scored:
  * ``query_aware``: for each question, the prompt context + question is prefilled and compressed together (the
    observation window holds the question), then the answer is decoded (SnapKV, KVCache-Factory, CAKE papers).
  * ``query_agnostic``: the context alone is prefilled and compressed once; each question is then appended over the
    compressed cache (uncompressed), answered, and rolled back, so all questions share one compressed context
    (kvpress, DefensiveKV).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from kvbench.engine.engine import Engine, sync_time
from kvbench.engine.vl import Prompt
from kvbench.errors import UsageError
from kvbench.metrics import score_prediction
from kvbench.prompt import encode_joint, postprocess_text
from kvbench.tasks.base import IMAGE, VIDEO, Question, Sample

SPLIT = "\u241eKVBENCH-SPLIT\u241e"
BULKY_META = ("turns",)  # per-context structures (a conversation's turns) not copied into every question's record


@dataclass
class RunOptions:
    """How every sample of a run is prompted, prefilled, decoded and scored.

    Attributes:
        protocol: ``query_aware`` or ``query_agnostic`` (see the module docstring).
        max_new_tokens, stop: greedy decoding limit and stop strings (the task's).
        metrics: metric names (``kvbench.metrics``).
        chat: wrap prompts in the tokenizer's chat template. max_length: prompt tokens before middle truncation.
        prefill_chunk: prefill the compressed prompt in blocks of this many tokens, compressing after each block
            (so the cache never holds more than budget x tokens seen + one block); None = one block.
        tokenize, truncation, chat_special_tokens, chat_kwargs: prompt encoding (``kvbench/prompt.py``):
            ``tokenize="joint"`` tokenizes context + question as one string, as official scripts do.
        postprocess: named steps applied to the decoded answer after the stop-string cut (``strip``,
            ``first_line``). eos_ids: extra end-of-sequence ids (the model's generation_config).
        eos_strings: strings whose token (the last of ``encode(s)``, LongBench's samsum "\n") also ends decoding.
        min_new_tokens: end-of-sequence ids are suppressed for this many first tokens (HF ``min_length``).
        vision: a vision-language model's prompt encoder (``kvbench.multimodal.VisionEncoder``), or None for a
            text model. Its prompts carry their images / frames (:func:`vision_prompt`).
    """

    protocol: str
    max_new_tokens: int
    stop: list[str]
    metrics: list[str]
    chat: bool = False
    max_length: int | None = None
    prefill_chunk: int | None = None
    tokenize: str = "separate"
    truncation: str = "context"
    chat_special_tokens: bool = False
    chat_kwargs: dict[str, Any] = field(default_factory=dict)
    postprocess: list[str] = field(default_factory=lambda: ["strip"])
    eos_ids: list[int] = field(default_factory=list)
    eos_strings: list[str] = field(default_factory=list)
    min_new_tokens: int = 0
    vision: Any = None


def encode(tok: PreTrainedTokenizerBase, context: str, question: str, chat: bool, max_length: int | None,
           answer_prefix: str = "", chat_kwargs: dict[str, Any] | None = None) -> tuple[list[int], list[int]]:
    """Context and question token ids; concatenated they are the full prompt.

    With ``chat`` the tokenizer's chat template wraps context + question as one user turn and is split at their
    boundary (kvpress's approach), so the question part carries the template's suffix; ``answer_prefix`` follows
    the template (RULER: ``model_template.format(task_template) + answer_prefix``), else it follows the question.
    Contexts longer than ``max_length`` (prompt + question) are cut in the middle, keeping the first and last halves.
    """
    if chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": context + SPLIT + question}], tokenize=False,
                                       add_generation_prompt=True, **(chat_kwargs or {}))
        prefix, suffix = text.split(SPLIT)
        ctx = tok(prefix, add_special_tokens=False).input_ids
        q = tok(suffix + answer_prefix, add_special_tokens=False).input_ids
    else:
        ctx = tok(context, add_special_tokens=True).input_ids
        q = tok(question + answer_prefix, add_special_tokens=False).input_ids
    if max_length and len(ctx) + len(q) > max_length:
        half = (max_length - len(q)) // 2
        ctx = ctx[:half] + ctx[len(ctx) - half :]
    return ctx, q


def encode_question(tok: PreTrainedTokenizerBase, context: str, q: Question, opts: RunOptions
                    ) -> tuple[list[int], list[int]]:
    """The prompt of one question under the run's options (separate or joint tokenization)."""
    if opts.tokenize == "joint":
        return encode_joint(tok, context, q.text, chat=opts.chat, max_length=opts.max_length,
                            truncation=opts.truncation, chat_special_tokens=opts.chat_special_tokens,
                            chat_kwargs=opts.chat_kwargs, answer_prefix=q.answer_prefix)
    return encode(tok, context, q.text, opts.chat, opts.max_length, q.answer_prefix, opts.chat_kwargs)


def eos_set(tok: PreTrainedTokenizerBase, opts: RunOptions | None = None) -> set[int]:
    """Token ids that end decoding: the tokenizer's EOS, the model's, and the last token of each eos string."""
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    if opts is not None:
        eos |= set(opts.eos_ids)
        encoded = [tok.encode(s, add_special_tokens=False) for s in opts.eos_strings]
        eos |= {ids[-1] for ids in encoded if ids}  # a tokenizer that cannot produce the string cannot stop on it
    return eos


def stopper(tok: PreTrainedTokenizerBase, stop: list[str], eos: set[int] | None = None
            ) -> Callable[[list[int]], bool]:
    eos = eos_set(tok) if eos is None else eos

    def should_stop(tokens: list[int]) -> bool:
        if tokens[-1] in eos:
            return True
        text = tok.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in stop)

    return should_stop


def postprocess(tok: PreTrainedTokenizerBase, tokens: list[int], stop: list[str], steps: list[str] | None = None
                ) -> str:
    """Decoded answer cut at the first stop string, then the named ``steps`` (default: strip)."""
    text = tok.decode(tokens, skip_special_tokens=True)
    cuts = [text.index(s) for s in stop if s in text]
    return postprocess_text(text[: min(cuts)] if cuts else text, ["strip"] if steps is None else steps)


def cache_stats(engine: Engine, n: int) -> dict[str, Any]:
    """Entries and bytes held right after compression, against the full cache of n tokens."""
    store = engine.store
    entries, nbytes = store.n_entries(), store.nbytes()
    stored_heads = sum(layer.n_heads for layer in store.layers if layer is not None)
    full_entries = n * engine.n_layers * engine.n_kv_heads  # the uncompressed cache, one entry per KV head
    return {
        "compressed_tokens": n,
        "kept_entries": entries,
        "full_entries": full_entries,
        "kept_fraction": entries / (n * stored_heads),  # per stored head (query heads in query_head mode)
        "kv_bytes_kept": nbytes,
        "kv_bytes_full": round(engine.layer_kind.full_bytes(store.layers) / entries * full_entries),
        "kept_per_layer": [sum(lens) for lens in store.lengths()],
        **layer_stats(engine),
    }


def layer_stats(engine: Engine) -> dict[str, dict[str, list[float | None]]]:
    """``{"layer_stats": {stat: [value per layer]}}``: the numeric per-layer scalars the method reported while
    compressing (e.g. ZipVL's ``prefill_attention_flops_saved``; None for a layer that did not report it), or
    nothing when it reported none."""
    per_layer = engine.layer_stats
    names = sorted({k for stats in per_layer.values() for k, v in stats.items() if isinstance(v, int | float)})
    if not names:
        return {}
    return {"layer_stats": {k: [per_layer.get(i, {}).get(k) for i in range(engine.n_layers)] for k in names}}


def prefill(engine: Engine, ids: list[int], spans: dict[str, tuple[int, int]], chunk: int | None = None
            ) -> tuple[torch.Tensor, dict]:
    """Fresh cache, compressed prefill (in blocks of ``chunk`` tokens if set); last logits and prefill statistics."""
    logits, seconds = timed_prefill(engine, ids, spans, chunk)
    return logits, prefill_stats(engine, len(ids), seconds - engine.compress_seconds)


def timed_prefill(engine: Engine, ids: list[int], spans: dict[str, tuple[int, int]], chunk: int | None = None
                  ) -> tuple[torch.Tensor, float]:
    """Fresh cache, compressed prefill; the last logits and the seconds it took (compression included)."""
    engine.reset()
    engine.spans = {**spans, **ids.spans} if isinstance(ids, Prompt) else spans
    if isinstance(ids, Prompt):  # a vision-language prompt: its pixel inputs go with its (one) prefill forward
        if chunk and chunk < len(ids):
            raise UsageError("prefill_chunk cannot cut a prompt with images or video frames into blocks (the model "
                             "merges their features into one forward); run without prefill_chunk")
        engine.vision = ids.vision
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    t0 = sync_time(engine.device)
    for start in range(0, len(ids), chunk or len(ids)):
        logits = engine.forward(ids[start : start + (chunk or len(ids))], compress=True)
    return logits, sync_time(engine.device) - t0


def prefill_stats(engine: Engine, n: int, prefill_s: float) -> dict[str, Any]:
    """The engine's cache after a compressed prefill of n tokens, with the prefill and compression seconds."""
    stats = cache_stats(engine, n)
    stats.update(prefill_s=prefill_s, compress_s=engine.compress_seconds,
                 peak_kv_bytes_prefill=engine.store.peak_bytes)
    return stats


def answer(engine: Engine, tok: PreTrainedTokenizerBase, logits: torch.Tensor, opts: RunOptions) -> dict[str, Any]:
    eos = eos_set(tok, opts)
    if opts.min_new_tokens > 0 and eos:  # HF min_length: no end-of-sequence token first (one step is enough here)
        logits = logits.clone()
        logits[..., sorted(eos)] = float("-inf")
    tokens, times = engine.generate(logits, opts.max_new_tokens, stopper(tok, opts.stop, eos))
    return {
        "prediction": postprocess(tok, tokens, opts.stop, opts.postprocess),
        "raw_prediction": tok.decode(tokens, skip_special_tokens=True),
        "new_tokens": len(tokens),
        "decode_s_per_token": sum(times) / len(times) if times else None,
    }


def prompt_hash(ids: list[int]) -> str:
    """sha256 (16 hex) of the prompt token ids the model was given (``PredictionRecord.prompt_hash``)."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]


def query_aware(engine: Engine, tok: PreTrainedTokenizerBase, sample: Sample, todo: list[Question],
                opts: RunOptions) -> Iterator[dict[str, Any]]:
    """Per question: context + question prefilled and compressed together, then the answer decoded."""
    for q in todo:
        ids, spans, extra = question_prompt(tok, sample, q, opts)
        logits, stats = prefill(engine, ids, spans, opts.prefill_chunk)
        yield question_record(engine, tok, sample, q, logits, opts, {**stats, **extra, "prompt_hash": prompt_hash(ids)})


def question_prompt(tok: PreTrainedTokenizerBase, sample: Sample, q: Question, opts: RunOptions
                    ) -> tuple[list[int], dict[str, tuple[int, int]], dict[str, int]]:
    """Query-aware prompt of one question: token ids, spans, and the token counts recorded with it."""
    if opts.vision is not None:
        ctx, q_ids = vision_prompt(tok, sample, q, opts)
    else:
        check_text_only(sample)
        ctx, q_ids = encode_question(tok, sample.context, q, opts)
    spans = {"context": (0, len(ctx)), "question": (len(ctx), len(ctx) + len(q_ids))}
    ids = Prompt(ctx + q_ids, ctx.vision, ctx.spans) if isinstance(ctx, Prompt) else ctx + q_ids
    return ids, spans, {"context_tokens": len(ctx), "question_tokens": len(q_ids)}


def context_prompt(tok: PreTrainedTokenizerBase, sample: Sample, opts: RunOptions) -> list[int]:
    """Query-agnostic context ids, encoded with the sample's first question (truncation leaves room for it), so a
    resumed run compresses exactly the context an uninterrupted one did."""
    if opts.vision is not None:
        return vision_prompt(tok, sample, sample.questions[0], opts)[0]
    check_text_only(sample)
    return encode_question(tok, sample.context, sample.questions[0], opts)[0]


def question_ids(tok: PreTrainedTokenizerBase, sample: Sample, q: Question, opts: RunOptions) -> list[int]:
    """The ids of a question appended over the sample's (compressed) context."""
    if opts.vision is not None:
        return tok(vision_texts(tok, sample, q, opts)[1], add_special_tokens=False).input_ids
    return encode_question(tok, sample.context, q, opts)[1]


def check_text_only(sample: Sample) -> None:
    """A text model's prompt never drops a sample's images silently."""
    if sample.images or len(sample.frames):
        raise UsageError(f"sample {sample.id} has images or video frames, which a text model cannot see; use a "
                         "vision-language model (family: vl)")


def chat_turns(sample: Sample, question: str) -> list[dict[str, Any]]:
    """The sample's chat turns with string contents (images as :data:`~kvbench.tasks.base.IMAGE` placeholders), the
    question text after the last user turn's content."""
    turns = sample.messages or [{"role": "user", "content": sample.context}]
    out = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else "".join(
        IMAGE if c["type"] == "image" else c.get("text", "") for c in m["content"])} for m in turns]
    last = max(i for i, m in enumerate(out) if m["role"] == "user")
    out[last] = {**out[last], "content": out[last]["content"] + question}
    return out


def vision_texts(tok: PreTrainedTokenizerBase, sample: Sample, q: Question, opts: RunOptions) -> tuple[str, str]:
    """A vision-language prompt's context and question texts: with ``chat`` the tokenizer's chat template over
    the sample's turns, split at the question (kvpress's approach, as :func:`encode`); else context and question.
    The question (and the template's suffix, then ``answer_prefix``) is text only."""
    if opts.chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(chat_turns(sample, SPLIT + q.text), tokenize=False,
                                       add_generation_prompt=True, **opts.chat_kwargs)
        prefix, suffix = text.split(SPLIT)
        return prefix, suffix + q.answer_prefix
    return sample.context, q.text + q.answer_prefix


def vision_prompt(tok: PreTrainedTokenizerBase, sample: Sample, q: Question, opts: RunOptions
                  ) -> tuple[Prompt, list[int]]:
    """The context as a :class:`Prompt` (ids, pixel inputs, image / frame spans) and the question's ids. A prompt
    longer than ``max_length`` is refused: it cannot be cut in the middle of an image; context and question are
    tokenized separately (``tokenize: joint`` is refused)."""
    if opts.tokenize != "separate":
        raise UsageError(f"task.tokenize={opts.tokenize} is not supported for vision-language prompts (their images "
                         "are expanded in the context); use tokenize: separate")
    prefix, suffix = vision_texts(tok, sample, q, opts)
    if IMAGE in suffix or VIDEO in suffix:
        raise UsageError(f"sample {sample.id}: images go in the context, not in question {q.id}'s text")
    ctx = opts.vision.encode(tok, prefix, sample.images, sample.frames)
    q_ids = tok(suffix, add_special_tokens=False).input_ids
    if opts.max_length and len(ctx) + len(q_ids) > opts.max_length:
        raise UsageError(f"sample {sample.id}: the prompt has {len(ctx) + len(q_ids)} tokens with its images, more "
                         f"than model.max_length={opts.max_length}; an image cannot be cut, so raise max_length or "
                         "use fewer or smaller images / frames")
    return ctx, q_ids


def query_agnostic(engine: Engine, tok: PreTrainedTokenizerBase, sample: Sample, todo: list[Question],
                   opts: RunOptions) -> Iterator[dict[str, Any]]:
    """Compress the context once; append, answer and roll back every question of ``todo`` over that cache."""
    if not todo:
        return
    ctx = context_prompt(tok, sample, opts)
    _, stats = prefill(engine, ctx, {"context": (0, len(ctx))}, opts.prefill_chunk)
    yield from ask_questions(engine, tok, sample, todo, opts, {**stats, "context_tokens": len(ctx)}, ctx)


def ask_questions(engine: Engine, tok: PreTrainedTokenizerBase, sample: Sample, todo: list[Question],
                  opts: RunOptions, stats: dict[str, Any], ctx: list[int]) -> Iterator[dict[str, Any]]:
    """Append, answer and roll back every question of ``todo`` over the engine's (compressed) context cache of
    ``ctx``; each record is yielded as soon as it is scored."""
    snap = engine.snapshot()
    for q in todo:
        engine.rollback(snap)
        engine.store.reset_peak()
        q_ids = question_ids(tok, sample, q, opts)
        t0 = sync_time(engine.device)
        q_logits = engine.forward(q_ids)
        extra = {"question_s": sync_time(engine.device) - t0, "question_tokens": len(q_ids),
                 "prompt_hash": prompt_hash(ctx + q_ids)}
        record = question_record(engine, tok, sample, q, q_logits, opts, {**stats, **extra})
        engine.rollback(snap)
        yield record


def metric_kwargs(sample: Sample, q: Question) -> dict[str, Any]:
    """Per-question metric extras (e.g. LongBench's ``all_classes``): ``meta["metric_kwargs"]``, question wins."""
    return {**sample.meta.get("metric_kwargs", {}), **q.meta.get("metric_kwargs", {})}


def question_record(engine: Engine, tok: PreTrainedTokenizerBase, sample: Sample, q: Question,
                    logits: torch.Tensor, opts: RunOptions, stats: dict[str, Any]) -> dict[str, Any]:
    out = answer(engine, tok, logits, opts)
    peak_mem = torch.cuda.max_memory_allocated(engine.device) if engine.device.type == "cuda" else None
    return {
        "id": f"{sample.id}/{q.id}",
        "sample_id": sample.id,
        "question_id": q.id,
        "prediction": out["prediction"],
        "raw_prediction": out["raw_prediction"],
        "references": q.answers,
        "scores": score_prediction(out["prediction"], q.answers, opts.metrics, **metric_kwargs(sample, q)),
        **stats,
        "new_tokens": out["new_tokens"],
        "decode_s_per_token": out["decode_s_per_token"],
        "peak_kv_bytes": max(engine.store.peak_bytes, stats["peak_kv_bytes_prefill"]),
        "peak_mem_bytes": peak_mem,
        "meta": {**{k: v for k, v in sample.meta.items() if k not in BULKY_META}, **q.meta},
    }

"""The episodic protocol: several compressed caches per context, each question routed to one (EpiCache).

The method (``episodic = True``) supplies the episodes (``episodes(sample, model, tok)``: a probe per episode),
per-layer budgets (``layer_budgets(engine, tok, n)``, e.g. from a sensitivity profile computed once per model),
and the routing (``route``). Every episode's cache is built by block-wise
prefill, evicting after each block with the episode's probe (``Engine.probe``), so the cache never holds more than
the budget plus one block plus the probe; the caches are kept as copies (EpiCache offloads them to CPU) and each
question is answered over its episode's cache and rolled back; each record is yielded as soon as it is scored.
A resumed context rebuilds its episode caches (deterministic) and answers only the questions not done yet.

Registered as the ``episodic`` protocol (:mod:`kvbench.protocols`), built on :mod:`kvbench.pipeline`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from transformers import PreTrainedTokenizerBase

from kvbench.engine.engine import Engine, sync_time
from kvbench.pipeline import RunOptions, cache_stats, context_prompt, encode_question, prompt_hash, question_record
from kvbench.tasks.base import Question, Sample


def build_cache(engine: Engine, ctx: list[int], probe_ids: list[int], block: int) -> dict[str, Any]:
    """Block-wise prefill of ``ctx`` with probe eviction after every block; returns the prefill statistics."""
    engine.reset()
    engine.spans = {"context": (0, len(ctx))}
    t0 = sync_time(engine.device)
    for start in range(0, len(ctx), block):
        engine.forward(ctx[start : start + block])
        engine.probe(probe_ids)
    total = sync_time(engine.device) - t0
    stats = cache_stats(engine, len(ctx))
    stats.update(prefill_s=total - engine.compress_seconds, compress_s=engine.compress_seconds,
                 peak_kv_bytes_prefill=engine.store.peak_bytes)
    return stats


def episodic(engine: Engine, tok: PreTrainedTokenizerBase, sample: Sample, todo: list[Question],
             opts: RunOptions) -> Iterator[dict[str, Any]]:
    """Build every episode's cache of the context, then answer each question of ``todo`` over its episode's."""
    if not todo:
        return
    method = engine.method
    ctx = context_prompt(tok, sample, opts)
    engine.layer_keep = method.layer_budgets(engine, tok, len(ctx))
    episodes = method.episodes(sample, engine.model, tok)
    caches, all_stats = [], []
    for ep in episodes:
        all_stats.append(build_cache(engine, ctx, ep.probe_ids, method.block))
        caches.append(engine.store.snapshot(copy=True))
    shared = {"prefill_s": sum(s["prefill_s"] for s in all_stats),  # E x one prefill, as in EpiCache
              "compress_s": sum(s["compress_s"] for s in all_stats),
              "peak_kv_bytes_prefill": max(s["peak_kv_bytes_prefill"] for s in all_stats),
              "n_episodes": len(episodes), "layer_keep": list(engine.layer_keep), "context_tokens": len(ctx)}
    for q in todo:
        e = method.route(q.text, episodes, engine.model, tok)
        engine.store.rollback(caches[e])
        engine.store.reset_peak()
        _, q_ids = encode_question(tok, sample.context, q, opts)
        t0 = sync_time(engine.device)
        logits = engine.forward(q_ids)
        extra = {"question_s": sync_time(engine.device) - t0, "question_tokens": len(q_ids), "episode": e,
                 "prompt_hash": prompt_hash(ctx + q_ids)}
        yield question_record(engine, tok, sample, q, logits, opts, {**all_stats[e], **shared, **extra})

"""Budget sweeps with one prefill: ``python -m kvbench method=snapkv 'budget=[0.05,0.1,0.2,0.3,0.5]'``.

For a method that compresses each layer right after the prefill's own attention over that layer, the prefill's
hidden states (and so every layer's queries, keys, values and the last logits) do not depend on the budget: only
what is stored afterwards does. A sweep over k budgets therefore runs each prompt's prefill once; right after a
layer's attention, the engine's own per-layer compression runs once per budget on a copy of that layer (the full
layer is dropped afterwards), giving k compressed caches that are entry-for-entry those of k separate runs. Each
budget then answers over its own cache (query-aware: per question; query-agnostic: every question appended over
its compressed context and rolled back), and its records go to the budget's *normal* run directory: the same
config.yaml and hash as ``budget=<b>`` alone, so resuming, ``kvbench.results`` and single runs cannot tell them
apart. Records carry ``shared_prefill: true``; their ``prefill_s`` is the shared prefill (the same number in
every budget's record), ``compress_s`` the budget's own scoring and selection, and ``peak_kv_bytes`` the peak a
separate run of that budget holds (replayed exactly: earlier layers compressed, the current one full). On CUDA,
``peak_mem_bytes`` is the process's peak since the shared prefill began, i.e. with every budget's cache held.

The only engine internal this relies on is ``Engine._compress_layer(module, queries, layer, scale)``, the per-layer
compression the engine runs right after a layer's prefill attention; ``SweepEngine`` runs it once per budget.

This module is engine-level only: the runner (``kvbench.runner``, the one execution path, where a single budget
is a sweep of one) drives it; it imports nothing of the runner. Fallback, budget after budget over the one loaded
model, with a log line: block-wise prefill
(``prefill_chunk``), where later blocks attend over the compressed cache, and methods with
``Method.shares_prefill = False`` (compression that changes the prefill itself or needs other layers' state).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kvbench.budget import Allocator
from kvbench.engine import Engine, KVStore, LayerContext, LayerKV
from kvbench.method import Method
from kvbench.pipeline import (
    RunOptions,
    ask_questions,
    context_prompt,
    prefill_stats,
    prompt_hash,
    question_prompt,
    question_record,
    timed_prefill,
)
from kvbench.tasks.base import Sample
from kvbench.validate import check_budgets


@dataclass
class Fork:
    """One budget's cache built from a shared prefill, and the seconds its compression took."""

    store: KVStore
    compress_s: float = 0.0


class _SharedMemo:
    """A method whose contexts for one layer share one ``LayerContext.memo`` across budgets.

    The memo holds what is computed from the layer's tensors alone, keyed by any further parameter (window
    attention per window size, H2O's column sums), so it is the same for every budget: computed once per layer
    instead of once per budget. The time it takes is counted in the first budget's compression.
    """

    def __init__(self, method: Method) -> None:
        self.method = method
        self.memo: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.method, name)

    def score(self, ctx: LayerContext) -> Tensor:
        ctx.memo = self.memo
        return self.method.score(ctx)


class SweepEngine(Engine):
    """An ``Engine`` whose compressed prefill leaves one compressed cache per budget (``fork``, then ``use``).

    Usage::

        with SweepEngine(model, method, allocator, budgets=[0.1, 0.2]) as eng:
            eng.fork([0.1, 0.2])
            logits = eng.forward(ids, compress=True)   # one prefill, two compressed caches
            eng.use(0.1)                               # decode over budget 0.1's cache
    """

    def __init__(self, model: nn.Module, method: Method, allocator: Allocator, budgets: list[float],
                 backend: str = "sdpa") -> None:
        super().__init__(model, method, allocator, budgets[0], backend)
        self.forks: dict[float, Fork] = {}
        self._forking = False

    def fork(self, budgets: list[float]) -> None:
        """The next compressed forward (a prefill on a fresh cache) fills one cache per budget."""
        self.forks = {b: Fork(KVStore(self.n_layers)) for b in budgets}
        self._forking = True

    def forward(self, ids: Tensor | list[int], compress: bool = False, decoding: bool = False) -> Tensor:
        logits = super().forward(ids, compress, decoding)
        if self._forking and compress:
            self._forking = False
            for fork in self.forks.values():  # layers the method left alone (fullkv) are shared as they are
                for i, layer in enumerate(self.store.layers):
                    if fork.store.layers[i] is None and layer is not None:
                        fork.store.layers[i] = layer.share()
                        fork.store.track_peak()
                fork.store.next_position = self.store.next_position
        return logits

    def _compress_layer(self, module: nn.Module, queries: Tensor, layer: LayerKV, scale: float) -> None:
        if not self._forking:
            return super()._compress_layer(module, queries, layer, scale)
        i = module.layer_idx
        hidden = self._hidden.get(i)
        method, self.method = self.method, _SharedMemo(self.method)  # type: ignore[assignment]
        try:
            for budget, fork in self.forks.items():
                own = layer.share()  # copy-on-write: costs nothing until a fork writes
                fork.store.layers[i] = own
                fork.store.track_peak()  # what a separate run holds here: earlier layers compressed, this one full
                self.budget, self.compress_seconds = budget, fork.compress_s
                if hidden is not None:
                    self._hidden[i] = hidden
                super()._compress_layer(module, queries, own, scale)
                fork.compress_s = self.compress_seconds
        finally:
            self.method = method
        self.store.layers[i] = None  # the full layer is no longer needed
        self.compress_seconds = sum(f.compress_s for f in self.forks.values())
        return None

    def use(self, budget: float) -> None:
        """Make ``budget``'s cache the engine's cache (decoding, question appends and statistics use it)."""
        fork = self.forks[budget]
        self.budget, self.store, self.compress_seconds = budget, fork.store, fork.compress_s


def sweep_sample(engine: SweepEngine, tok: PreTrainedTokenizerBase, sample: Sample, opts: RunOptions,
                 done: dict[float, set[str]]) -> Iterator[tuple[float, dict[str, Any]]]:
    """(budget, record) for every question of ``sample`` that a budget has not done yet, each as soon as it is
    scored; one prefill per prompt."""
    todo = {b: [q for q in sample.questions if f"{sample.id}/{q.id}" not in ids] for b, ids in done.items()}
    if opts.protocol == "query_agnostic":
        budgets = [b for b, qs in todo.items() if qs]
        if not budgets:
            return
        ctx = context_prompt(tok, sample, opts)  # the same context for every budget, resumed or not
        for b, _, stats in shared_prefill(engine, ctx, {"context": (0, len(ctx))}, budgets):
            for record in ask_questions(engine, tok, sample, todo[b], opts, {**stats, "context_tokens": len(ctx)},
                                        ctx):
                yield b, record
        return
    for q in sample.questions:
        budgets = [b for b, qs in todo.items() if any(x.id == q.id for x in qs)]
        if budgets:
            ids, spans, extra = question_prompt(tok, sample, q, opts)
            for b, logits, stats in shared_prefill(engine, ids, spans, budgets):
                yield b, question_record(engine, tok, sample, q, logits, opts,
                                         {**stats, **extra, "prompt_hash": prompt_hash(ids)})


def shared_prefill(engine: SweepEngine, ids: list[int], spans: dict[str, tuple[int, int]], budgets: list[float]
                   ) -> Iterator[tuple[float, Tensor, dict[str, Any]]]:
    """Prefill once for all ``budgets``; then switch the engine to each budget's cache in turn and yield the budget,
    the prompt's last logits (the same for every budget) and the budget's prefill statistics."""
    engine.fork(budgets)
    logits, seconds = timed_prefill(engine, ids, spans)
    shared_s = seconds - engine.compress_seconds  # the model's forward, without any budget's compression
    for b in budgets:
        engine.use(b)
        yield b, logits, {**prefill_stats(engine, len(ids), shared_s), "shared_prefill": True}


def budget_configs(cfg: DictConfig) -> dict[float, DictConfig]:
    """One configuration per budget of ``budget=<b>`` or ``budget=[...]``, each exactly the config of a run with
    that one budget (a single budget is a sweep of one)."""
    raw = list(cfg.budget) if OmegaConf.is_list(cfg.budget) else [cfg.budget]
    out = {}
    for value, b in zip(raw, check_budgets(raw), strict=True):
        one = copy.deepcopy(cfg)
        with open_dict(one):
            one.budget = value  # as typed (0.1, 128): the run directory and config hash of `budget=<raw>` alone
        out[b] = one
    return out


# Flags under which a method or allocator changes the prefill or keeps per-budget state outside the cache; the
# engine's cross-layer allocation, cascading re-trims, decode-time eviction and episodic caches set them.
def fallback_reason(cfg: DictConfig, method: Method, allocator: Allocator) -> str | None:
    """Why this sweep cannot share its prefill (None if it can); read from the classes' declared flags."""
    if cfg.get("prefill_chunk"):
        return "block-wise prefill (prefill_chunk) attends over the compressed cache of earlier blocks"
    flags = [f for f, on in (("cascading", method.cascading), ("decode_evict", method.decode_evict),
                             ("episodic", method.episodic)) if on]
    if not method.shares_prefill or flags:
        return f"method {cfg.method.name} does not share its prefill ({', '.join(flags) or 'shares_prefill = False'})"
    if not allocator.shares_prefill or allocator.cross_layer:
        return (f"allocator {cfg.allocator.name} plans across layers "
                f"({'cross_layer' if allocator.cross_layer else 'shares_prefill = False'})")
    return None

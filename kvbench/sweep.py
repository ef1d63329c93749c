"""Budget sweeps and method grids with one prefill: ``python -m kvbench method=snapkv 'budget=[0.05,0.1,0.2]'``,
``python -m kvbench 'methods=[fullkv,snapkv,adakv]' 'budget=[0.1,0.2,0.5]'``.

For a method that compresses each layer right after the prefill's own attention over that layer, the prefill's
hidden states (and so every layer's queries, keys, values and the last logits) do not depend on the budget, nor on
the method: only what is stored afterwards does. A job over k variants (a *variant* is a (method, allocator,
budget); a budget sweep is a job of one method) therefore runs each prompt's prefill once; right after a layer's
attention, the engine's own per-layer compression runs once per variant, as that variant's method, allocator and
budget, on a copy of that layer (the full layer is dropped afterwards), giving k compressed caches that are
entry-for-entry those of k separate runs. Each variant then answers over its own cache (query-aware: per question;
query-agnostic: every question appended over its compressed context and rolled back), and its records go to its
*normal* run directory: the same config.yaml and hash as ``method=<m> budget=<b>`` alone, so resuming,
``kvbench.results`` and single runs cannot tell them apart. Records carry ``shared_prefill: true``; their
``prefill_s`` is the shared prefill (the same number in every variant's record), ``compress_s`` the variant's own
scoring and selection, and ``peak_kv_bytes`` the peak a separate run of that variant holds (replayed exactly:
earlier layers compressed, the current one full). The budgets of a method that neither compresses nor plans
(fullkv) keep the same full cache, so one of them answers for all (``answer_groups``): one decode per prompt
instead of one per budget, its records copied to each budget's run directory and marked ``shared_answer: true``.
On CUDA, ``peak_mem_bytes`` is the process's peak since the shared prefill began, i.e. with every variant's cache
held.

What is shared between methods is only the prefill forward and the last logits. Each method is its own instance
(built from its own config, shared by its budgets) with its own per-layer ``LayerContext.memo`` (``_SharedMemo``:
window attention or H2O's column sums are computed once per layer and method, never passed to another method or
parameter set); a method without compression (fullkv) takes the full layers as they are, once for all its
budgets. A method grid's configs are composed as ``method=<name>`` with the job's overrides would be
(``method_configs``: the method's defaults, e.g. its allocator, included) and must agree on everything but the
method, allocator and protocol.

The only engine internal this relies on is ``Engine._compress_layer(module, queries, layer, scale)``, the per-layer
compression the engine runs right after a layer's prefill attention; ``SweepEngine`` runs it once per variant.

This module is engine-level only: the runner (``kvbench.runner``, the one execution path, where a single run is a
job of one) drives it; it imports nothing of the runner. Variants share one prefill when they see the same prompt
(protocol) and store their layers alike (``Method.cache``: ``share_key``). Fallback, run after run over the one
loaded model after the shared prefill, with one log line (``fallback_reason``): block-wise prefill
(``prefill_chunk``), where later blocks attend over the compressed cache; methods with
``Method.shares_prefill = False`` or that cascade, evict while decoding or build episodic caches (compression that
changes the prefill itself, needs other layers' state or keeps state outside the cache); quantised layer stores;
and cross-layer allocators.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kvbench.budget import Allocator
from kvbench.engine import Engine, KVStore, LayerContext, LayerKV
from kvbench.engine.engine import check_model
from kvbench.errors import UsageError
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
from kvbench.validate import check_budgets, check_config, check_methods


@dataclass(frozen=True)
class Variant:
    """One cache a shared prefill is forked into: a method (one instance per method config, shared by that
    method's budgets), its allocator and a budget."""

    method: Method
    allocator: Allocator
    budget: float


@dataclass
class Fork:
    """One variant's cache built from a shared prefill, the seconds its compression took and its decode budgets."""

    variant: Variant
    store: KVStore
    compress_s: float = 0.0
    decode_budget: dict[int, tuple[int, int]] = field(default_factory=dict)


class _SharedMemo:
    """One method's contexts for one layer, sharing one ``LayerContext.memo`` across that method's budgets.

    The memo holds what is computed from the layer's tensors alone, keyed by any further parameter (window
    attention per window size, H2O's column sums), so it is the same for every budget: computed once per layer
    instead of once per budget. The time it takes is counted in the first budget's compression. Each method
    instance has its own (two methods, or one method with other parameters, never share a memo).
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
    """An ``Engine`` whose compressed prefill leaves one compressed cache per variant (``fork``, then ``use``).

    A variant is a budget of the engine's method (``budgets``) or, in a method grid, any (method, allocator,
    budget) (``SweepEngine.over(model, {key: Variant})``); the variants of one engine store their layers alike
    (the same ``Method.cache`` layout, evicting stores). Usage::

        with SweepEngine(model, method, allocator, budgets=[0.1, 0.2]) as eng:
            eng.fork([0.1, 0.2])
            logits = eng.forward(ids, compress=True)   # one prefill, two compressed caches
            eng.use(0.1)                               # decode over budget 0.1's cache
    """

    def __init__(self, model: nn.Module, method: Method, allocator: Allocator, budgets: list[float],
                 backend: str = "sdpa", variants: dict[Hashable, Variant] | None = None) -> None:
        variants = variants or {b: Variant(method, allocator, b) for b in budgets}
        first = next(iter(variants.values()))
        super().__init__(model, first.method, first.allocator, first.budget, backend)
        check_variants(model, list(variants.values()))
        self.variants = variants
        self.forks: dict[Hashable, Fork] = {}
        self._forking = False  # the next compressed forward is the shared prefill
        self._splitting = False  # inside the shared prefill: every layer is compressed once per fork

    @classmethod
    def over(cls, model: nn.Module, variants: dict[Hashable, Variant], backend: str = "sdpa") -> SweepEngine:
        """An engine forking into the given variants (a method grid: several methods, allocators and budgets)."""
        first = next(iter(variants.values()))
        return cls(model, first.method, first.allocator, [first.budget], backend, variants)

    def fork(self, keys: list[Hashable]) -> None:
        """The next compressed forward (a prefill on a fresh cache) fills one cache per variant key."""
        self.forks = {k: Fork(self.variants[k], KVStore(self.n_layers)) for k in keys}
        self._forking = True

    def forward(self, ids: Tensor | list[int], compress: bool = False, decoding: bool = False) -> Tensor:
        if not (self._forking and compress):
            return super().forward(ids, compress, decoding)
        self._forking, self._splitting, lead = False, True, self.method
        # the forward compresses when any variant does (fullkv's fork takes the full layers as they are)
        self.method = next((f.variant.method for f in self.forks.values() if f.variant.method.compresses), lead)
        self.store = _ReplayStore(self.n_layers, self.store.layers, self.store.next_position,
                                  forks=[f.store for f in self.forks.values()])
        try:
            logits = super().forward(ids, compress)
        finally:
            self._splitting, self.method = False, lead
        for fork in self.forks.values():  # layers no variant compressed (local layers, fullkv) are shared as is
            for i, layer in enumerate(self.store.layers):
                if fork.store.layers[i] is None and layer is not None:
                    fork.store.layers[i] = layer.share()
            fork.store.next_position = self.store.next_position
        return logits

    def _compress_layer(self, module: nn.Module, queries: Tensor, layer: LayerKV, scale: float) -> None:
        if not self._splitting:
            return super()._compress_layer(module, queries, layer, scale)
        i = module.layer_idx
        hidden, lead = self._hidden.get(i), (self.method, self.allocator, self.budget)
        memos: dict[int, _SharedMemo] = {}  # one per method instance: its budgets share it, other methods never
        try:
            for fork in self.forks.values():
                own = layer.share()  # copy-on-write: costs nothing until a fork writes
                fork.store.layers[i] = own  # its peak was replayed as the shared store tracked this layer, full
                method = fork.variant.method
                if method.compresses:
                    memo = memos.setdefault(id(method), _SharedMemo(method))
                    self._compress_fork(fork, memo, module, queries, own, scale, hidden)
        finally:
            self.method, self.allocator, self.budget = lead
        self.store.layers[i] = None  # the full layer is no longer needed
        self.compress_seconds = sum(f.compress_s for f in self.forks.values())
        return None

    def _compress_fork(self, fork: Fork, memo: _SharedMemo, module: nn.Module, queries: Tensor, layer: LayerKV,
                       scale: float, hidden: Tensor | None) -> None:
        """The engine's own per-layer compression of one fork's copy of the layer, as that variant."""
        self.method, self.allocator, self.budget = memo, fork.variant.allocator, fork.variant.budget  # type: ignore
        self.compress_seconds, self.decode_budget = fork.compress_s, fork.decode_budget
        if hidden is not None:
            self._hidden[module.layer_idx] = hidden
        super()._compress_layer(module, queries, layer, scale)
        fork.compress_s = self.compress_seconds

    def use(self, key: Hashable) -> None:
        """Make variant ``key``'s cache the engine's cache (decoding, question appends and statistics use it, with
        that variant's method, allocator and budget)."""
        fork = self.forks[key]
        self.method, self.allocator, self.budget = fork.variant.method, fork.variant.allocator, fork.variant.budget
        self.store, self.compress_seconds, self.decode_budget = fork.store, fork.compress_s, fork.decode_budget


@dataclass
class _ReplayStore(KVStore):
    """The shared prefill's own cache. Whenever it tracks its peak (a layer just stored, full; a local layer before
    its trim), every fork tracks what a separate run of its variant holds at that moment: the fork's own layers plus
    the shared layers it has not received yet (the layer being attended, the local layers, fullkv's full layers)."""

    forks: list[KVStore] = field(default_factory=list)

    def track_peak(self) -> None:
        super().track_peak()
        for fork in self.forks:
            pending = [layer for own, layer in zip(fork.layers, self.layers, strict=True)
                       if own is None and layer is not None]
            fork.peak_bytes = max(fork.peak_bytes, fork.nbytes() + sum(x.nbytes() for x in pending))
            fork.peak_allocated_bytes = max(fork.peak_allocated_bytes,
                                            fork.allocated_bytes() + sum(x.allocated_bytes() for x in pending))


def check_variants(model: nn.Module, variants: list[Variant]) -> None:
    """The variants of one shared prefill store their layers alike, and the model suits every method."""
    layouts = {(v.method.cache, v.method.layer_store) for v in variants}
    if len(layouts) > 1:
        raise ValueError(f"one shared prefill stores its layers one way; these variants need {sorted(layouts)}")
    for method in {id(v.method): v.method for v in variants}.values():
        check_model(model, method)


def sweep_sample(engine: SweepEngine, tok: PreTrainedTokenizerBase, sample: Sample, opts: RunOptions,
                 done: dict[Hashable, set[str]]) -> Iterator[tuple[Hashable, dict[str, Any]]]:
    """(variant key, record) for every question of ``sample`` that a variant (a budget, or a (method, budget))
    has not done yet, each as soon as it is scored; one prefill per prompt, one answer per group of variants
    whose caches are identical (``answer_groups``)."""
    todo = {k: [q for q in sample.questions if f"{sample.id}/{q.id}" not in ids] for k, ids in done.items()}
    if opts.protocol == "query_agnostic":
        groups = answer_groups(engine, [k for k, qs in todo.items() if qs], todo)
        if not groups:
            return
        ctx = context_prompt(tok, sample, opts)  # the same context for every variant, resumed or not
        for k, _, stats in shared_prefill(engine, ctx, {"context": (0, len(ctx))}, list(groups)):
            for record in ask_questions(engine, tok, sample, todo[k], opts, {**stats, "context_tokens": len(ctx)},
                                        ctx):
                yield from copies(groups[k], record)
        return
    for q in sample.questions:
        groups = answer_groups(engine, [k for k, qs in todo.items() if any(x.id == q.id for x in qs)])
        if groups:
            ids, spans, extra = question_prompt(tok, sample, q, opts)
            for k, logits, stats in shared_prefill(engine, ids, spans, list(groups)):
                record = question_record(engine, tok, sample, q, logits, opts,
                                         {**stats, **extra, "prompt_hash": prompt_hash(ids)})
                yield from copies(groups[k], record)


def answer_groups(engine: SweepEngine, keys: list[Hashable], todo: dict[Hashable, list] | None = None
                  ) -> dict[Hashable, list[Hashable]]:
    """The keys that answer, each with every key it answers for (itself first). The budgets of one method that
    neither compresses nor plans (fullkv) hold the same full cache, so the same answers: one of them answers, once
    per prompt, for all of them (with the same questions still to do). Every other key answers for itself."""
    groups: dict[Hashable, list[Hashable]] = {}
    for k in keys:
        method = engine.variants[k].method
        budget_free = not (method.compresses or method.plans)
        ask = tuple(q.id for q in todo[k]) if todo else ()
        groups.setdefault(("same", id(method), ask) if budget_free else ("own", k), []).append(k)
    return {g[0]: g for g in groups.values()}


def copies(keys: list[Hashable], record: dict[str, Any]) -> Iterator[tuple[Hashable, dict[str, Any]]]:
    """``record`` for each key of one answer group; a group of several marks its records ``shared_answer``."""
    if len(keys) == 1:
        yield keys[0], record
        return
    for k in keys:
        yield k, {**copy.deepcopy(record), "shared_answer": True}


def shared_prefill(engine: SweepEngine, ids: list[int], spans: dict[str, tuple[int, int]], keys: list[Hashable]
                   ) -> Iterator[tuple[Hashable, Tensor, dict[str, Any]]]:
    """Prefill once for all variant ``keys`` (budgets, or (method, budget) pairs); then switch the engine to each
    variant's cache in turn and yield its key, the prompt's last logits (the same for every variant) and the
    variant's prefill statistics."""
    engine.fork(keys)
    logits, seconds = timed_prefill(engine, ids, spans)
    shared_s = seconds - engine.compress_seconds  # the model's forward, without any variant's compression
    for k in keys:
        engine.use(k)
        yield k, logits, {**prefill_stats(engine, len(ids), shared_s), "shared_prefill": True}


def budget_configs(cfg: DictConfig) -> dict[float, DictConfig]:
    """One configuration per budget of ``budget=<b>`` or ``budget=[...]``, each exactly the config of a run with
    that one budget (a single budget is a sweep of one). ``methods`` names a job's runs, not a run's setting: no
    run's config (config.yaml, hash) holds it."""
    raw = list(cfg.budget) if OmegaConf.is_list(cfg.budget) else [cfg.budget]
    out = {}
    for value, b in zip(raw, check_budgets(raw), strict=True):
        one = copy.deepcopy(cfg)
        with open_dict(one):
            one.budget = value  # as typed (0.1, 128): the run directory and config hash of `budget=<raw>` alone
            one.pop("methods", None)
        out[b] = one
    return out


def method_configs(cfg: DictConfig, overrides: Sequence[str] | None) -> dict[str, DictConfig]:
    """One configuration per method of ``methods=[a,b,...]``, each composed exactly as ``method=<name>`` with the
    job's other ``overrides`` (a method's defaults, e.g. its allocator, included; an explicit ``allocator=`` wins
    as it does for one method). The methods must agree on everything but the method, allocator and protocol."""
    names = check_methods(OmegaConf.to_container(cfg.methods) if OmegaConf.is_list(cfg.methods) else cfg.methods)
    if overrides is None:
        raise UsageError("methods=[...] composes each method's config from the job's overrides: pass them, "
                         "run(cfg, overrides=[...]) (python -m kvbench does)")
    if given := [o for o in overrides if override_key(o) == "method"]:
        raise UsageError(f"{given[0]} and methods={names} both name the method; give one of them (in a sweep "
                         "file, drop hydra.sweeper.params.method with ~hydra.sweeper.params.method)")
    kept = [o for o in overrides if override_key(o) != "methods"]
    out = {name: compose_config([*kept, f"method={name}"]) for name in names}
    check_one_job(out)
    return out


def override_key(override: str) -> str:
    """The key a command-line override sets (``+methods=[a]`` -> ``methods``; ``method=a`` -> ``method``)."""
    return override.lstrip("+~").partition("=")[0]


def compose_config(overrides: list[str]) -> DictConfig:
    """The config ``python -m kvbench <overrides>`` composes (inside a Hydra app or ``initialize_config_dir``
    block, with its config search path; else from kvbench's own conf/)."""
    from kvbench.__main__ import CONF_DIR

    try:
        if GlobalHydra.instance().is_initialized():
            return compose("config", overrides=overrides)
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("config", overrides=overrides)
    except HydraException as err:
        raise UsageError(f"cannot compose {' '.join(overrides)}: {err}") from err


# keys in which the methods of one grid may differ (a method's config may set the protocol, e.g. epicache's)
PER_METHOD_KEYS = ("method", "allocator", "protocol", "run_id", "run_dir")


def check_one_job(configs: dict[str, DictConfig]) -> None:
    """The configs of one method grid load the same model, task and data (else one error naming the key)."""
    shared = {name: {k: v for k, v in check_config(one).items() if k not in PER_METHOD_KEYS}
              for name, one in configs.items()}
    first, base = next(iter(shared.items()))
    for name, keys in shared.items():
        if diff := sorted(k for k in base.keys() | keys.keys() if base.get(k) != keys.get(k)):
            raise UsageError(f"methods: method={name} sets {', '.join(diff)} unlike method={first}; one job shares "
                             "the model, task and data: run that method in a job of its own")


def share_key(cfg: DictConfig, method: Method) -> tuple[str, str]:
    """What a shared prefill needs its variants to agree on: the prompt (protocol) and the stored layers' layout."""
    return str(cfg.protocol), method.cache


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
    if method.layer_store != "evict":
        return f"method {cfg.method.name} stores {method.layer_store} layers"
    if not allocator.shares_prefill or allocator.cross_layer:
        return (f"allocator {cfg.allocator.name} plans across layers "
                f"({'cross_layer' if allocator.cross_layer else 'shares_prefill = False'})")
    return None

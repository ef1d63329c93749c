"""The KV-cache engine: runs a transformers model over kvbench's own ragged cache and compresses it per layer.

How it plugs in: inside ``with Engine(...)`` every attention module's ``config._attn_implementation`` is the
registered ``"kvbench"`` attention function, and the model is called with ``use_cache=False`` and explicit
``position_ids``. The attention function therefore receives the post-RoPE q/k/v of the *new* tokens only; it
stores k/v in the engine's ``KVStore`` and attends over it. This needs no transformers ``Cache`` internals (which
changed between 4.57 and 5.x); transformers' own ``generate`` runs over the same attention through a thin
``Cache`` shim whose forwards are bracketed by ``begin``/``end`` (``kvbench.engine.hfcache``). What differs
between model families (which modules are the attention layers, their KV heads and sliding windows, how positions
are built and the model is called, which config routes the attention) is declared by the family's adapter
(``kvbench.engine.adapters``); a model without one, or with an attention feature the engine does not implement, is
refused with one message naming it.

Prefill attention always uses the full K/V; right after a layer's attention the engine scores that layer with its
own window queries (methods_core §1.1) and keeps only the selected entries, so later layers of the same prefill
already see a smaller total cache. Kept tokens keep their original RoPE positions and new tokens continue from the
logical (uncompressed) length.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface

from kvbench.budget import Allocator, LayerScores, Uniform, default_decode_budget, tokens_per_head
from kvbench.engine import local
from kvbench.engine.adapters import ModelAdapter, UnsupportedModelError, adapter_for
from kvbench.engine.attention import cached_attention, causal_attention, check_backend, masked_attention
from kvbench.engine.context import LayerContext
from kvbench.engine.quant import layer_kind
from kvbench.engine.store import KVStore, LayerKV
from kvbench.engine.view import head_indices, layer_view, mask_padding, valid_candidates
from kvbench.engine.vl import VisionInputs
from kvbench.ops import stable_ranks, topk_per_head

if TYPE_CHECKING:  # kvbench.method imports the engine's LayerContext
    from kvbench.method import Method

ATTN_NAME = "kvbench"


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The engine builds its own masks; transformers need not build an (n, n) one."""
    return None


# attention-function keyword arguments that carry a feature the engine does not implement (refused when set)
UNSUPPORTED_KWARGS = {"softcap": "attention logit soft-capping", "s_aux": "learned attention sinks",
                      "sinks": "learned attention sinks"}


def _kvbench_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                       dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None,
                       **kwargs: Any) -> tuple[Tensor, None]:
    engine = getattr(module, "_kvbench_engine", None)
    if engine is None:
        raise RuntimeError("the 'kvbench' attention implementation only runs inside `with Engine(model, ...)`")
    for name, what in UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise UnsupportedModelError(f"layer {module.layer_idx} uses {what} ({name}); the kvbench engine does "
                                        "not implement it, so the results would be wrong")
    engine.check_window(module.layer_idx, sliding_window)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return engine.attend(module, query, key, value, scale), None


def register_attention() -> None:
    """Register the engine's attention (and a no-op mask builder) with transformers; idempotent."""
    AttentionInterface.register(ATTN_NAME, _kvbench_attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(ATTN_NAME, _no_mask)
    except ImportError:  # transformers without mask interfaces build masks from attention_mask only
        pass


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder's self-attention modules in layer order (as the model family's adapter declares them)."""
    return [layer.module for layer in adapter_for(model).attention_layers()]


def check_model(model: nn.Module, method: Method) -> ModelAdapter:
    """The model's adapter, once its family and attention features are known to be supported and the method has
    layers to compress; one clear error otherwise. The runner calls it right after loading the model, before a
    run directory is claimed; the engine again when it is built."""
    adapter = adapter_for(model)
    if method.compresses and all(layer.sliding_window for layer in adapter.attention_layers()):
        raise UnsupportedModelError(
            f"every layer of this {adapter.family!r} model attends within a sliding window; kvbench's methods "
            "compress global layers only (a local layer keeps its window: kvbench/engine/local.py), so "
            f"method={method.name} would compress nothing"
        )
    return adapter


def sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class Engine:
    """Context manager holding one model, one method, one allocator and one budget.

    Usage::

        with Engine(model, method, allocator, budget=0.2) as eng:
            eng.reset()
            logits = eng.forward(prompt_ids, compress=True)   # prefill, compressed per layer
            tokens, times = eng.generate(logits, max_new_tokens=32)
    """

    def __init__(self, model: nn.Module, method: Method, allocator: Allocator, budget: float,
                 backend: str = "sdpa") -> None:
        self.model, self.method, self.allocator, self.budget = model, method, allocator, budget
        self.backend = check_backend(backend)
        self.layer_kind = layer_kind(method, allocator, budget)  # how layers are stored and attended (declared)
        self.adapter = check_model(model, method)
        self.layers = self.adapter.attention_layers()
        self.modules = [layer.module for layer in self.layers]
        self.n_layers = len(self.modules)
        self.n_kv_heads = self.layers[0].n_kv_heads  # heads of an unexpanded cache
        self.windows = {layer.index: layer.sliding_window for layer in self.layers if layer.sliding_window}
        self.compressed_layers = [layer.index for layer in self.layers if layer.sliding_window is None]
        self.device = next(model.parameters()).device
        self.store = KVStore(self.n_layers)
        self.spans: dict[str, tuple[int, int]] = {}
        self.vision: VisionInputs | None = None  # the pixel inputs of the prompt a fresh cache is prefilled with
        self.compress_seconds = 0.0
        self.decode_budget: dict[int, tuple[int, int]] = {}  # layer -> (kept candidates, window) after prefill
        self._pending: dict[int, LayerScores] = {}  # cross-layer allocation: scored layers awaiting their counts
        self._ranks: dict[int, Tensor] = {}  # their candidates' stable ranks, from the first trim on (``_trim``)
        self._positions: Tensor | None = None
        self._step_end = 0
        self._compress = False
        self._decoding = False
        self._probe = False
        self.layer_keep: list[int] | None = None  # probe eviction: tokens per KV head each layer keeps
        self.attention_mask: Tensor | None = None  # (n, n) bool for a fresh-cache forward instead of causal
        self._hidden: dict[int, Tensor] = {}
        self._plan_queries: dict[int, list[Tensor]] = {}  # plans: queries of the tokens added since the last plan
        self._prefill_ctx: dict[int, tuple[LayerContext, Tensor]] = {}  # own_prefill_attention: context and plan
        self.layer_stats: dict[int, dict[str, Any]] = {}  # per-layer scalars a plan method reported at prefill
        self._hooks: list[Any] = []
        self._saved_impl: Any = None

    # -- context management -------------------------------------------------------------------------------------
    def __enter__(self) -> Engine:
        register_attention()
        config = self.adapter.attn_config()  # the decoder's config only: a vision tower keeps its attention
        self._saved_impl = config._attn_implementation
        config._attn_implementation = ATTN_NAME
        for m in self.modules:
            m._kvbench_engine = self
            self._hooks.append(m.register_forward_pre_hook(self._capture_hidden, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        self.adapter.attn_config()._attn_implementation = self._saved_impl
        for m in self.modules:
            m.__dict__.pop("_kvbench_engine", None)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _capture_hidden(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._compress:
            hs = kwargs.get("hidden_states", args[0] if args else None)
            self._hidden[module.layer_idx] = hs[0]

    # -- running the model --------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new, empty cache (a new sample)."""
        self.store = KVStore(self.n_layers)
        self.spans = {}
        self.vision = None
        self.compress_seconds = 0.0
        self.decode_budget = {}
        self._pending, self._ranks = {}, {}
        self._plan_queries, self._prefill_ctx, self.layer_stats = {}, {}, {}

    def snapshot(self) -> Any:
        """A point to ``rollback`` to; a full copy when decode-time eviction may evict tokens before it or the
        layers are quantised (a flush of the full-precision residual cannot be undone by truncation). Local
        (sliding-window) layers drop their oldest tokens as new ones come, so they are always copied (they hold
        at most 1.25 W tokens)."""
        quantized = self.layer_kind.name == "quantized"  # a rollback cannot undo a flush of the residual
        layers, position = self.store.snapshot(copy=self.method.decode_evict or quantized)
        for i in self.windows:
            if self.store.layers[i] is not None:
                layers[i] = self.store.layers[i].clone()
        return layers, position

    def check_window(self, index: int, window: int | None) -> None:
        """The model applies the sliding window its adapter declared for this layer (else one clear error)."""
        if window != self.windows.get(index):
            raise UnsupportedModelError(
                f"layer {index} attends within a sliding window of {window} but the {self.adapter.family!r} "
                f"adapter declared {self.windows.get(index)}; fix the adapter in kvbench/engine/adapters.py"
            )

    def rollback(self, snap: Any) -> None:
        self.store.rollback(snap)
        self._plan_queries = {}  # tokens added after the snapshot are gone; earlier unplanned ones are planned HIGH

    @torch.inference_mode()
    def forward(self, ids: Tensor | list[int], compress: bool = False, decoding: bool = False) -> Tensor:
        """Run q new tokens over the cache; return the logits of the last one, (vocab,).

        With ``compress=True`` every layer is compressed right after its attention in this forward; ``decoding``
        marks a decode step (a method with ``decode_evict`` evicts then). The first forward of a fresh cache takes
        ``self.vision`` (a vision-language prompt's pixel inputs) with it.
        """
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        start = self.begin(ids.numel(), compress, decoding)
        vision = self.vision if start == 0 else None
        try:
            logits = self.adapter.forward(ids, self.adapter.positions(ids, start, vision), vision)
        except BaseException:
            self.end(advance=False)
            raise
        self.end()
        return logits

    def begin(self, n: int, compress: bool = False, decoding: bool = False) -> int:
        """Prepare the attention of a forward of n new tokens after the cache; returns the logical length before
        it (where their positions start). ``forward`` brackets the model call with ``begin``/``end``; a caller that
        runs the model itself (``kvbench.engine.hfcache``: transformers' ``generate``) does the same."""
        start = self.store.next_position
        self._positions = torch.arange(start, start + n, device=self.device)
        self._step_end = start + n  # the logical length once the forward is done (no device sync to read it)
        self._compress = compress and (self.method.compresses or self.method.plans)
        self._decoding = decoding
        self._pending, self._ranks = {}, {}  # cross-layer allocation plans over the layers scored in this forward
        return start

    def end(self, advance: bool = True) -> None:
        """After the forward ``begin`` prepared: the logical length moves past its tokens (unless it failed)."""
        self._compress = self._decoding = False
        self._hidden.clear()
        if advance:
            self.store.next_position = self._step_end

    @torch.inference_mode()
    def probe(self, ids: Tensor | list[int]) -> None:
        """Evict with a probe: run ``ids`` after the cache without storing them, and let every layer keep its
        ``layer_keep[l]`` tokens per KV head by ``method.probe_scores`` of the probe's own queries (EpiCache's
        patched-prompt scoring, KVzip-style reconstruction probes). The probe's keys are held only during its own
        attention (counted in the peak)."""
        if self.layer_keep is None:
            raise RuntimeError("Engine.probe needs layer_keep (tokens per KV head for every layer)")
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        start = self.store.next_position
        self._positions = torch.arange(start, start + ids.numel(), device=self.device)
        self._probe = True
        try:
            self.adapter.forward(ids, self.adapter.positions(ids, start, None))
        finally:
            self._probe = False

    def generate(self, logits: Tensor, max_new_tokens: int,
                 should_stop: Callable[[list[int]], bool] | None = None) -> tuple[list[int], list[float]]:
        """Greedy decoding from ``logits``; returns the tokens and the seconds of every decode forward."""
        tokens: list[int] = []
        times: list[float] = []
        for _ in range(max_new_tokens):
            tokens.append(int(logits.argmax()))
            if len(tokens) == max_new_tokens or (should_stop is not None and should_stop(tokens)):
                break
            t0 = sync_time(self.device)
            logits = self.forward([tokens[-1]], decoding=True)
            times.append(sync_time(self.device) - t0)
        return tokens, times

    # -- the attention function ---------------------------------------------------------------------------------
    def attend(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        """query (1, Hq, q, d), key/value (1, Hkv, q, d) post-RoPE for the new tokens -> (1, q, Hq, d)."""
        if query.shape[0] != 1:
            raise ValueError("the kvbench engine runs one sample at a time (batch size 1)")
        if self.method.cache == "query_head":  # one cache per query head (G x the memory), as in KVCache-Factory
            g = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
        i = module.layer_idx
        layer = self.store.layers[i]
        if self._probe:
            return self._attend_probe(module, query, key, value, scale)
        if i in self.windows:
            return self._attend_local(i, query, key, value, scale)
        if layer is None:
            out = self._prefill_attention(module, query, key, value, scale)
            layer = self.layer_kind.build(key[0], value[0], self._positions)
            self.store.layers[i] = layer
        else:
            layer.append(key[0], value[0], self._positions)
            out = self.layer_kind.attend(layer, query[0], scale, self.backend)[None]
        self.store.track_peak()
        if self._compress:
            self._compress_layer(module, query[0], layer, scale)
        elif self.method.plans:
            self._replan(module, query[0], layer, scale)
        elif self._decoding and self.method.decode_evict and i in self.decode_budget:
            self._evict_on_decode(module, query[0], layer, scale)
        return out

    def _attend_local(self, i: int, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        """A sliding-window layer: attend within the window, then keep (about) the window (``kvbench.engine.local``).
        Probe tokens are attended but not kept. query (1, Hq, q, d), key/value (1, Hkv, q, d) -> (1, q, Hq, d)."""
        window, layer = self.windows[i], self.store.layers[i]
        if layer is None:
            layer = LayerKV.from_dense(key[0], value[0], self._positions)
            self.store.layers[i] = layer
            saved = layer.lens[:0]
        else:
            saved = layer.lens.clone()
            layer.append(key[0], value[0], self._positions)
        self.store.track_peak()
        k, v = layer.dense()
        k_pos = layer.head(0)[2]  # a view: every head of a local layer holds the same tokens
        if self.attention_mask is not None and not len(saved):  # a masked fresh-cache forward (a sensitivity profile)
            mask = self.attention_mask & local.window_mask(self._positions, k_pos, window)
            out = masked_attention(query, key, value, mask, scale)
        else:
            out = local.local_attention(query, k[None], v[None], self._positions, k_pos, window, scale, self.backend)
        if self._probe:
            layer.truncate(saved)
        elif local.needs_trim(k.shape[1], window):
            layer.select(local.last_tokens(k.shape[1], window, layer.n_heads, layer.lens.device))
        return out

    def _prefill_attention(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, scale: float
                           ) -> Tensor:
        """A fresh layer's attention: dense causal (or ``attention_mask``), or the method's own when it declares
        ``own_prefill_attention``. For such a method the layer's plan comes first, timed as compression (ZipVL's
        probe scoring, which also picks the tokens its sparse attention attends among); the method's attention reads
        it from the context's memo, and the same plan is applied once the layer is stored (``_plan_layer``).
        (1, Hq, q, d) x 3 -> (1, q, Hq, d)."""
        if self.attention_mask is not None:
            return masked_attention(query, key, value, self.attention_mask, scale)
        if not (self._compress and self.method.own_prefill_attention):
            return causal_attention(query, key, value, scale, self.backend)
        t0 = sync_time(self.device)
        ctx = self._plan_context(module, query[0], key[0], value[0], self._positions, scale)
        self._prefill_ctx[module.layer_idx] = (ctx, self.method.plan(ctx))
        self.compress_seconds += sync_time(self.device) - t0
        return self.method.prefill_attention(ctx, self.backend)[None]

    def _plan_context(self, module: nn.Module, queries: Tensor, keys: Tensor, values: Tensor, positions: Tensor,
                      scale: float) -> LayerContext:
        return LayerContext(
            layer_idx=module.layer_idx, n_layers=self.n_layers, module=module, queries=queries, keys=keys,
            values=values, positions=positions, window=0, keep=tokens_per_head(self.budget, queries.shape[1]),
            scaling=scale, hidden_states=self._hidden.get(module.layer_idx), spans=self.spans,
        )

    def _plan_layer(self, module: nn.Module, queries: Tensor, layer: Any, scale: float) -> None:
        """plans: apply the method's plan for the layer's last q tokens (q = ``queries.shape[1]``)."""
        t0 = sync_time(self.device)
        ctx, plan = self._prefill_ctx.pop(module.layer_idx, (None, None))
        if ctx is None:
            view = layer_view(layer)
            ctx = self._plan_context(module, queries, view.keys, view.values, view.positions, scale)
            plan = self.method.plan(ctx)
        layer.apply_tail_plan(plan, *self.method.plan_bits())
        if self._compress:
            self.layer_stats[module.layer_idx] = dict(ctx.stats)
        self.compress_seconds += sync_time(self.device) - t0

    def _replan(self, module: nn.Module, query: Tensor, layer: Any, scale: float) -> None:
        """plans: keep the queries of the tokens not planned yet; plan those tokens once ``replan_interval()`` came
        (ZipVL's re-compression every 100 generated tokens). query (Hq, q, d)."""
        every, i = self.method.replan_interval(), module.layer_idx
        if every <= 0:
            return
        self._plan_queries.setdefault(i, []).append(query)  # at most ``every`` tokens' queries per layer
        if sum(q.shape[1] for q in self._plan_queries[i]) >= every:
            self._plan_layer(module, torch.cat(self._plan_queries.pop(i), dim=1), layer, scale)

    def _compress_layer(self, module: nn.Module, queries: Tensor, layer: LayerKV, scale: float) -> None:
        """Score a (global) layer right after its attention and keep what the allocator grants (a plan method:
        apply its plan, ``_plan_layer``).

        A ragged layer (per-head lengths from an earlier block) is scored through its left-padded view
        (``kvbench.engine.view``), so block-wise prefill works with every allocator through this one path."""
        if self.method.plans:
            return self._plan_layer(module, queries, layer, scale)
        keep = tokens_per_head(self.budget, int(self._positions[-1]) + 1)  # of all tokens seen, evicted or not
        window = min(self.method.window, keep, queries.shape[1])  # never more than this forward's queries
        default = default_decode_budget(self.budget, int(self._positions[-1]) + 1, self.method.window)
        if default is not None:  # CAKE's C - w also when the prompt needs no compression (select/_trim refine it)
            self.decode_budget[module.layer_idx] = default
        if int(layer.lens.sum()) <= keep * layer.n_heads:
            return
        t0 = sync_time(self.device)
        view = layer_view(layer)
        ctx = LayerContext(
            layer_idx=module.layer_idx, n_layers=self.n_layers, module=module, queries=queries, keys=view.keys,
            values=view.values, positions=view.positions, window=window, keep=keep, scaling=scale,
            hidden_states=self._hidden.pop(module.layer_idx, None), spans=self.spans, pad=view.pad,
        )
        scores = mask_padding(self.method.score(ctx), view.pad)
        if self.allocator.cross_layer:
            check_scores(scores, ctx)
            self._pending[ctx.layer_idx] = LayerScores(scores, ctx.n, dict(ctx.stats), pad=view.pad)
            if self.method.cascading or ctx.layer_idx == self.compressed_layers[-1]:
                plan = self.allocator.plan(self._pending, keep, len(self.compressed_layers))
                for j, counts in plan.items():
                    self._trim(j, counts)
        else:
            layer.select(select_tokens(scores, ctx, self.allocator))
            if layer.uniform:
                self.decode_budget[ctx.layer_idx] = (int(layer.lens[0]) - ctx.window, ctx.window)
        self.compress_seconds += sync_time(self.device) - t0

    def _trim(self, i: int, counts: Tensor) -> None:
        """Keep layer i's top-``counts[h]`` candidates per head (within its current cache) plus its tail.

        The picks are ``topk_per_head``'s sets, read from the candidates' stable ranks (computed at the layer's first
        trim). The pending scores and ranks are gathered alongside, so a later, smaller plan (cascading) selects a
        subset with one comparison: the kept ranks are 0 .. c - 1, and the top c' < c of them are those below c'.
        """
        p, layer = self._pending[i], self.store.layers[i]
        h, m = p.scores.shape
        counts = torch.minimum(counts.clamp(0, m), valid_candidates(m, h, p.pad).to(counts.device))
        if p.pad is None and bool((counts == m).all()):  # every candidate stays (a cascade step that grants a layer
            self.decode_budget[i] = (m, p.n - m)  # at least what it holds): the cache and its scores are as they are
            return
        if i not in self._ranks:  # the layer's first trim
            self._ranks[i] = stable_ranks(p.scores)
        rank = self._ranks[i]  # (H, m)
        keep = rank < counts.to(rank.device)[:, None]  # (H, m) each head's top counts[h], ties to the lower index
        picks = keep.nonzero()[:, 1].split(counts.tolist())  # ascending indices per head
        tail = torch.arange(m, p.n, device=p.scores.device)
        layer.select(head_indices([torch.cat([idx, tail]) for idx in picks], p.pad))
        self.decode_budget[i] = (int(counts[0]), p.n - m)
        if bool((counts == counts[0]).all()) and p.pad is None:
            c = int(counts[0])
            p.scores, self._ranks[i] = p.scores[keep].view(h, c), rank[keep].view(h, c)  # (H, c)
            p.n = c + p.n - m
        else:  # ragged now: no dense scores left to re-trim with
            del self._pending[i], self._ranks[i]

    def _attend_probe(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        if module.layer_idx in self.windows:  # a local layer keeps its window; the probe only passes through
            return self._attend_local(module.layer_idx, query, key, value, scale)
        layer = self.store.layers[module.layer_idx]
        saved = layer.lens.clone()
        layer.append(key[0], value[0], self._positions)
        self.store.track_peak()
        out = cached_attention(query[0], layer, scale, self.backend)[None]
        layer.truncate(saved)
        t0 = sync_time(self.device)
        keep = self.layer_keep[module.layer_idx]
        if int(layer.lens.max()) > keep:
            scores = self.method.probe_scores(query[0], layer, scale)  # (H, max len_h), -inf past each head's end
            counts = self.allocator.allocate(scores, keep, module.layer_idx, self.n_layers)
            layer.select(topk_per_head(scores, torch.minimum(counts, layer.lens)))
        self.compress_seconds += sync_time(self.device) - t0
        return out

    def _evict_on_decode(self, module: nn.Module, query: Tensor, layer: LayerKV, scale: float) -> None:
        """Decode-time eviction (CAKE): back to the layer's prefill budget, scored by this step's query alone."""
        budget, window = self.decode_budget[module.layer_idx]
        if not layer.uniform or int(layer.lens[0]) <= budget + window:
            return
        t0 = sync_time(self.device)
        keys, values = layer.dense()
        ctx = LayerContext(
            layer_idx=module.layer_idx, n_layers=self.n_layers, module=module, queries=query, keys=keys,
            values=values, positions=layer.head(0)[2], window=window, keep=budget + window, scaling=scale,
            spans=self.spans,
        )
        layer.select(select_tokens(self.method.decode_score(ctx), ctx, Uniform()))
        self.compress_seconds += sync_time(self.device) - t0


def check_scores(scores: Tensor, ctx: LayerContext) -> None:
    n = ctx.n
    if scores.shape[0] != ctx.n_kv_heads or scores.shape[-1] not in (n, n - ctx.window):
        raise ValueError(f"score() must return ({ctx.n_kv_heads}, {n - ctx.window}) or ({ctx.n_kv_heads}, {n}), "
                         f"got {tuple(scores.shape)}")


def select_tokens(scores: Tensor, ctx: LayerContext, allocator: Allocator) -> list[Tensor]:
    """Turn a method's scores into the kept within-head indices of every KV head.

    scores (H, m) cover the first m tokens; the n - m trailing ones (the window) are always kept. The allocator
    decides how many of the m candidates each head keeps, given the per-head budget minus the window.
    On a ragged layer's left-padded view (``ctx.pad``), padding scores are -inf, the counts are clamped to each
    head's real candidates, and the picks are turned back into within-head indices.
    """
    check_scores(scores, ctx)
    n, m = ctx.n, scores.shape[-1]
    counts = allocator.allocate(scores, max(ctx.keep - (n - m), 0), ctx.layer_idx, ctx.n_layers, ctx=ctx)
    counts = torch.minimum(counts, valid_candidates(m, scores.shape[0], ctx.pad).to(counts.device))
    tail = torch.arange(m, n, device=scores.device)
    return head_indices([torch.cat([idx, tail]) for idx in topk_per_head(scores, counts)], ctx.pad)

"""The KV-cache engine: runs a transformers model over kvbench's own ragged cache and compresses it per layer.

How it plugs in: inside ``with Engine(...)`` every attention module's ``config._attn_implementation`` is the
registered ``"kvbench"`` attention function, and the model is called with ``use_cache=False`` and explicit
``position_ids``. The attention function therefore receives the post-RoPE q/k/v of the *new* tokens only; it
stores k/v in the engine's ``KVStore`` and attends over it. This needs no transformers ``Cache`` internals (which
changed between 4.57 and 5.x) and works for Llama, Mistral, Qwen2 and Qwen3 alike.

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

from kvbench.budget import Allocator, LayerScores, Uniform, tokens_per_head
from kvbench.engine.attention import cached_attention, causal_attention, check_backend, masked_attention
from kvbench.engine.context import LayerContext
from kvbench.engine.quant import layer_kind
from kvbench.engine.store import KVStore, LayerKV
from kvbench.ops import topk_per_head

if TYPE_CHECKING:  # kvbench.method imports the engine's LayerContext
    from kvbench.method import Method

ATTN_NAME = "kvbench"


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The engine builds its own masks; transformers need not build an (n, n) one."""
    return None


def _kvbench_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                       dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    engine = getattr(module, "_kvbench_engine", None)
    if engine is None:
        raise RuntimeError("the 'kvbench' attention implementation only runs inside `with Engine(model, ...)`")
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
    """The decoder's self-attention modules in layer order."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    return sorted(mods, key=lambda m: m.layer_idx)


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
        self.modules = attention_modules(model)
        self.n_layers = len(self.modules)
        self.n_kv_heads = model.config.get_text_config().num_key_value_heads  # heads of an unexpanded cache
        self.device = next(model.parameters()).device
        self.store = KVStore(self.n_layers)
        self.spans: dict[str, tuple[int, int]] = {}
        self.compress_seconds = 0.0
        self.decode_budget: dict[int, tuple[int, int]] = {}  # layer -> (kept candidates, window) after prefill
        self._pending: dict[int, LayerScores] = {}  # cross-layer allocation: scored layers awaiting their counts
        self._positions: Tensor | None = None
        self._compress = False
        self._decoding = False
        self._probe = False
        self.layer_keep: list[int] | None = None  # probe eviction: tokens per KV head each layer keeps
        self.attention_mask: Tensor | None = None  # (n, n) bool for a fresh-cache forward instead of causal
        self._hidden: dict[int, Tensor] = {}
        self._hooks: list[Any] = []
        self._saved_impl: Any = None

    # -- context management -------------------------------------------------------------------------------------
    def __enter__(self) -> Engine:
        register_attention()
        self._saved_impl = self.model.config._attn_implementation
        self.model.config._attn_implementation = ATTN_NAME
        for m in self.modules:
            m._kvbench_engine = self
            self._hooks.append(m.register_forward_pre_hook(self._capture_hidden, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        self.model.config._attn_implementation = self._saved_impl
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
        self.compress_seconds = 0.0
        self.decode_budget = {}
        self._pending = {}

    def snapshot(self) -> Any:
        """A point to ``rollback`` to; a full copy when decode-time eviction may evict tokens before it."""
        return self.store.snapshot(copy=self.method.decode_evict)

    def rollback(self, snap: Any) -> None:
        self.store.rollback(snap)

    @torch.inference_mode()
    def forward(self, ids: Tensor | list[int], compress: bool = False) -> Tensor:
        """Run q new tokens over the cache; return the logits of the last one, (vocab,).

        With ``compress=True`` every layer is compressed right after its attention in this forward.
        """
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        start = self.store.next_position
        self._positions = torch.arange(start, start + ids.numel(), device=self.device)
        self._compress = compress and self.method.compresses
        try:
            out = self.model(input_ids=ids[None], position_ids=self._positions[None], use_cache=False,
                             logits_to_keep=1)
        finally:
            self._compress = False
            self._hidden.clear()
        self.store.next_position = start + ids.numel()
        return out.logits[0, -1]

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
            self.model(input_ids=ids[None], position_ids=self._positions[None], use_cache=False, logits_to_keep=1)
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
            self._decoding = True
            try:
                logits = self.forward([tokens[-1]])
            finally:
                self._decoding = False
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
        if layer is None:
            out = (causal_attention(query, key, value, scale, self.backend) if self.attention_mask is None
                   else masked_attention(query, key, value, self.attention_mask, scale))
            layer = self.layer_kind.build(key[0], value[0], self._positions)
            self.store.layers[i] = layer
        else:
            layer.append(key[0], value[0], self._positions)
            out = self.layer_kind.attend(layer, query[0], scale, self.backend)[None]
        self.store.track_peak()
        if self._compress:
            self._compress_layer(module, query[0], layer, scale)
        elif self._decoding and self.method.decode_evict and i in self.decode_budget:
            self._evict_on_decode(module, query[0], layer, scale)
        return out

    def _compress_layer(self, module: nn.Module, queries: Tensor, layer: LayerKV, scale: float) -> None:
        if not layer.uniform:
            raise RuntimeError(
                "this layer already has per-head lengths (a head-adaptive allocator compressed it earlier); "
                "re-compressing it, e.g. block-wise with prefill_chunk, is only supported with uniform or "
                "pyramid allocators for now"
            )
        n = int(layer.lens[0])
        keep = tokens_per_head(self.budget, int(self._positions[-1]) + 1)  # of all tokens seen, evicted or not
        if keep >= n:
            return
        t0 = sync_time(self.device)
        keys, values = layer.dense()
        window = min(self.method.window, keep, queries.shape[1])  # never more than this forward's queries
        ctx = LayerContext(
            layer_idx=module.layer_idx, n_layers=self.n_layers, module=module, queries=queries, keys=keys,
            values=values, positions=layer.positions[:n], window=window, keep=keep, scaling=scale,
            hidden_states=self._hidden.pop(module.layer_idx, None), spans=self.spans,
        )
        scores = self.method.score(ctx)
        if self.allocator.cross_layer:
            check_scores(scores, ctx)
            self._pending[ctx.layer_idx] = LayerScores(scores, n, dict(ctx.stats))
            if self.method.cascading or ctx.layer_idx == self.n_layers - 1:
                for j, counts in self.allocator.plan(self._pending, keep, self.n_layers).items():
                    self._trim(j, counts)
        else:
            layer.select(select_tokens(scores, ctx, self.allocator))
            self.decode_budget[ctx.layer_idx] = (int(layer.lens[0]) - ctx.window, ctx.window)
        self.compress_seconds += sync_time(self.device) - t0

    def _trim(self, i: int, counts: Tensor) -> None:
        """Keep layer i's top-``counts[h]`` candidates per head (within its current cache) plus its tail.

        The layer's pending scores are gathered alongside, so a later, smaller plan (cascading) selects a subset.
        """
        p, layer = self._pending[i], self.store.layers[i]
        h, m = p.scores.shape
        counts = counts.clamp(0, m)
        picks = [idx.sort().values for idx in topk_per_head(p.scores, counts)]
        tail = torch.arange(m, p.n, device=p.scores.device)
        layer.select([torch.cat([idx, tail]) for idx in picks])
        self.decode_budget[i] = (int(counts[0]), p.n - m)
        if bool((counts == counts[0]).all()):
            p.scores = torch.stack([p.scores[k, idx] for k, idx in enumerate(picks)])  # (H, counts)
            p.n = int(counts[0]) + p.n - m
        else:  # ragged now: no dense scores left to re-trim with
            del self._pending[i]

    def _attend_probe(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
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
        n = keys.shape[1]
        ctx = LayerContext(
            layer_idx=module.layer_idx, n_layers=self.n_layers, module=module, queries=query, keys=keys,
            values=values, positions=layer.positions[:n], window=window, keep=budget + window, scaling=scale,
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
    """
    check_scores(scores, ctx)
    n, m = ctx.n, scores.shape[-1]
    counts = allocator.allocate(scores, max(ctx.keep - (n - m), 0), ctx.layer_idx, ctx.n_layers, ctx=ctx)
    tail = torch.arange(m, n, device=scores.device)
    return [torch.cat([idx, tail]) for idx in topk_per_head(scores, counts)]

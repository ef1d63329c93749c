"""transformers' own ``generate()`` over the engine's cache: ``KVBenchCache`` and ``GenerateBinding``.

The engine already runs every attention layer of the model (``Engine.__enter__`` routes the decoder's attention to
the registered ``"kvbench"`` function, which stores the new keys/values in the engine's ``KVStore``, attends over
it and compresses it). What ``generate()`` needs on top is a ``transformers.Cache`` it can pass along:

* ``KVBenchCache`` is that cache. Its ``update()`` hands the new keys/values on unchanged to the attention
  function (the engine stores them there, so nothing is held twice), and its ``get_seq_length()`` is the store's
  *logical* length (every token seen, evicted or not). ``generate`` derives the next tokens' positions from it
  (and from the attention mask, which grows by one per step), so eviction never shifts RoPE positions, exactly as
  in ``Engine.forward``. Masks are the engine's own (the ``"kvbench"`` mask function builds none), so
  ``get_mask_sizes`` only reports the logical sizes.
* ``GenerateBinding`` brackets every forward of the model that carries a ``KVBenchCache`` with
  ``Engine.begin``/``Engine.end``, as ``Engine.forward`` does: the first forward over a fresh cache (the prompt)
  is compressed per layer (the CLI's query-aware prefill), later single-token forwards are decode steps
  (decode-time eviction, CAKE), later longer ones are appended uncompressed (a question over a compressed
  context). It also makes ``model.generate`` start from a fresh ``KVBenchCache`` when none is passed.

Refused with one :class:`~kvbench.errors.UsageError` each (they would be silently wrong): a batch of more than one
sequence (beam search, ``num_return_sequences``), padding in the attention mask, positions that are not the
logical ones, ``use_cache=False``, generate's chunked prefill (``prefill_chunk_size``: later chunks would be
appended uncompressed), a forward of the model with no ``KVBenchCache`` inside the binding, and a cache of an
earlier ``generate`` call once a new one has started (the engine holds one sample's cache at a time).

Versions: transformers 4.57 passes ``past_key_values=`` and calls a layer's ``get_mask_sizes(cache_position)``;
5.x passes ``cache=`` and calls ``get_mask_sizes(query_length)``; both are handled here.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin

from kvbench.engine.engine import Engine, sync_time
from kvbench.errors import UsageError


def cache_kwarg(model: nn.Module) -> str:
    """The keyword under which this transformers version passes a cache to the model and to ``generate``
    (``cache`` from 5.x on, ``past_key_values`` before; 5.x still accepts the old name with a warning)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


class EngineLayer(CacheLayerMixin):
    """One decoder layer of a ``KVBenchCache``: no tensors of its own; lengths are the store's logical length."""

    is_compileable = False
    is_sliding = False  # the engine applies the layer's sliding window itself (kvbench/engine/local.py)

    def __init__(self, cache: KVBenchCache) -> None:
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, *args: Any, **kwargs: Any) -> None:
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """The new tokens' keys/values, (1, H_kv, q, d), on to the attention function, which stores them."""
        self.is_initialized = True
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.cache.store.next_position

    def get_mask_sizes(self, query: Tensor | int) -> tuple[int, int]:
        """(kv_length, kv_offset) of the logical cache; ``query`` is 4.57's cache_position or 5.x's query length."""
        q = query.shape[0] if isinstance(query, Tensor) else int(query)
        return self.get_seq_length() + q, 0

    def get_max_length(self) -> int:  # transformers 5.x
        return -1

    def get_max_cache_shape(self) -> int:  # transformers 4.57
        return -1


class KVBenchCache(Cache):
    """A ``transformers.Cache`` backed by an engine's ``KVStore`` (module doc). Made by ``GenerateBinding``.

    Attributes:
        engine: the engine whose attention fills and compresses it.
        store: the engine's store for this cache (``store.nbytes()`` kept entries, ``store.allocated_bytes()``
            buffers, ``store.next_position`` the logical length).
    """

    def __init__(self, engine: Engine) -> None:
        engine.reset()
        self.engine, self.store = engine, engine.store
        super().__init__(layers=[EngineLayer(self) for _ in range(engine.n_layers)])

    def check_current(self) -> None:
        if self.engine.store is not self.store:
            raise UsageError("this KVBenchCache belongs to an earlier generate() call: the engine now holds a newer "
                             "cache (one sample at a time); continue from the newest output's cache")

    def nbytes(self) -> int:
        """Bytes of the kept (compressed) entries."""
        return self.store.nbytes()


class GenerateBinding:
    """Inside ``with GenerateBinding(model, engine):`` (the engine entered), ``model.generate(...)`` runs over a
    fresh ``KVBenchCache`` (or the one passed) and every model forward with that cache is one engine step.

    ``on_step(n, prompt, seconds)`` is called after every such forward: n new tokens, whether it was the
    compressed prompt, and its seconds (compression included)."""

    def __init__(self, model: nn.Module, engine: Engine,
                 on_step: Callable[[int, bool, float], None] | None = None) -> None:
        self.model, self.engine, self.on_step = model, engine, on_step
        self.key = cache_kwarg(model)
        self.cache: KVBenchCache | None = None  # the newest cache made or seen
        self._hooks: list[Any] = []
        self._step: tuple[int, bool, float] = (0, False, 0.0)  # the running forward: n, prompt, start time

    def __enter__(self) -> GenerateBinding:
        if "generate" in vars(self.model):
            raise UsageError("this model's generate() is already bound (a kvbench.compress block is open on it)")
        self._hooks = [self.model.register_forward_pre_hook(self._begin, with_kwargs=True),
                       self.model.register_forward_hook(self._end, with_kwargs=True)]
        self.model.generate = types.MethodType(self._generate, self.model)  # an instance attribute, removed on exit
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        vars(self.model).pop("generate", None)

    def new_cache(self) -> KVBenchCache:
        """A fresh, empty cache over the engine (what ``generate`` gets when none is passed)."""
        self.cache = KVBenchCache(self.engine)
        return self.cache

    def _generate(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("use_cache") is False:
            raise UsageError("use_cache=False inside kvbench.compress: the compressed cache is the point; drop it")
        config = kwargs.get("generation_config") or model.generation_config
        if kwargs.get("prefill_chunk_size") or config.prefill_chunk_size:
            raise UsageError("generate's prefill_chunk_size would append the later prompt chunks uncompressed; "
                             "block-wise compressed prefill is the CLI's prefill_chunk option")
        cache = kwargs.get(self.key)
        if cache is None:
            kwargs[self.key] = self.new_cache()
        elif not isinstance(cache, KVBenchCache):
            raise UsageError(f"inside kvbench.compress, generate() runs over kvbench's cache; got {self.key}="
                             f"{type(cache).__name__} (pass none, or a KVBenchCache from an earlier output)")
        else:
            cache.check_current()  # before generate reads its length
        return type(model).generate(model, *args, **kwargs)

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get(self.key)
        if cache is None and kwargs.get("use_cache") is False:
            return  # the engine's own forward (Engine.forward calls the model without a cache)
        if not isinstance(cache, KVBenchCache) or cache.engine is not self.engine:
            raise UsageError("inside kvbench.compress the model attends over kvbench's cache: call "
                             "model.generate(...), or pass the handle's cache (handle.new_cache())")
        cache.check_current()
        self.cache = cache
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if inputs is None and args:
            inputs = args[0]
        if inputs.shape[0] != 1:
            raise UsageError(f"kvbench.compress runs one sequence at a time (batch size 1); got a batch of "
                             f"{inputs.shape[0]} (several prompts, beam search or num_return_sequences > 1)")
        n, start = inputs.shape[1], cache.store.next_position
        check_inputs(kwargs.get("attention_mask"), kwargs.get("position_ids"), start, n)
        self._step = (n, start == 0, sync_time(self.engine.device))
        self.engine.begin(n, compress=start == 0, decoding=start > 0 and n == 1)

    def _end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if isinstance(kwargs.get(self.key), KVBenchCache):
            self.engine.end()
            n, prompt, t0 = self._step
            if self.on_step is not None:
                self.on_step(n, prompt, sync_time(self.engine.device) - t0)


def check_inputs(mask: Tensor | None, position_ids: Tensor | None, start: int, n: int) -> None:
    """No padding in the prompt's attention mask (the engine attends to every cached token), and position ids equal
    to the logical ones (checked on the first and last new token: O(1) per decode step)."""
    if start == 0 and mask is not None and mask.dim() == 2 and not bool(mask.all()):
        raise UsageError("the attention mask has padding (zeros); kvbench.compress runs one unpadded sequence")
    if position_ids is not None:
        got = (int(position_ids[..., 0].flatten()[0]), int(position_ids[..., -1].flatten()[0]))
        if got != (start, start + n - 1):
            raise UsageError(f"position ids {got[0]}..{got[1]} are not the logical positions {start}..{start + n - 1} "
                             "of the new tokens (kvbench keeps positions of evicted tokens)")


__all__ = ["GenerateBinding", "KVBenchCache", "cache_kwarg"]


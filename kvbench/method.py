"""Base class of every KV-cache method: a small dataclass that scores one layer's cached tokens.

A method answers *which* tokens matter (``score``); *how many* each layer and head keeps is decided by a separate
allocator (``kvbench.budget``), and the mechanics (hooks, top-k, gather, positions, ragged storage) live in the
engine. Adding a method = ``methods/<name>.py`` (a subclass) + ``conf/method/<name>.yaml``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from kvbench.engine.context import LayerContext
from kvbench.engine.store import LayerKV
from kvbench.errors import UsageError

if TYPE_CHECKING:
    from kvbench.engine.quant import QuantSpec


@dataclass
class Method(ABC):
    """Scores cached tokens at prefill; higher means keep.

    Attributes:
        name: the method's name (the config file stem; used in run directories).
        window: observation window / always-kept recent tokens (clamped by the engine to the per-head budget).
        cache: ``kv_head`` (default) stores one cache per KV head; ``query_head`` repeats the KV heads to the query
            heads before compression and keeps one token set per query head, as KVCache-Factory (legacy) and the
            AdaKV repo do by default. That reproduces their numbers but holds G times the memory, and the reported
            bytes show it.
    """

    name: str = ""
    window: int = 0
    cache: str = "kv_head"

    def __post_init__(self) -> None:
        if self.cache not in ("kv_head", "query_head"):
            raise UsageError(f"cache={self.cache!r}; use 'kv_head' or 'query_head'")

    compresses: ClassVar[bool] = True
    # True when a layer's compression needs only that layer's own prefill state (its LayerContext), so that one
    # prefill can be forked into several budgets (``budget=[...]``, kvbench.sweep). Methods that re-trim earlier
    # layers, evict against other layers' state or otherwise change the prefill itself set it False; their budget
    # sweeps then run one budget after another.
    shares_prefill: ClassVar[bool] = True
    cascading: ClassVar[bool] = False  # cross-layer allocators: re-plan after every layer (CAKE), not only the last
    keeps_window: ClassVar[bool] = True  # the last ``window`` tokens always survive (False: they compete)
    decode_evict: ClassVar[bool] = False  # evict during generation too, keeping every layer at its prefill budget
    # How the engine stores a layer (kvbench.engine.quant.layer_kind): "evict" = LayerKV, full-precision kept
    # entries; "quantized" = QuantLayerKV, packed low-bit keys/values as ``quant_spec()`` says (KIVI, ZipVL).
    layer_store: ClassVar[str] = "evict"

    def quant_spec(self) -> QuantSpec:
        """Bit widths, group size and residual of a ``layer_store = "quantized"`` method's cache."""
        raise NotImplementedError(f"{type(self).__name__} sets layer_store='quantized' but has no quant_spec()")

    # Per-token plans instead of scores (ZipVL): ``plan(ctx)`` gives every token of the layer EVICT / LOW / HIGH
    # (kvbench.engine.quant) and the engine applies it to the quantised layer (``layer_store = "quantized"``) at
    # every budget, also 1.0; again while generating, every ``replan_interval()`` new tokens, for those tokens.
    plans: ClassVar[bool] = False
    # A plan method that computes the prefill attention of the layers it compresses itself (``prefill_attention``:
    # ZipVL's sparse attention over its important tokens) instead of the engine's dense causal attention.
    own_prefill_attention: ClassVar[bool] = False
    # False when the method needs the whole prompt in one forward (GUI-KV's image spans and hidden states, ZipVL's
    # sparse prefill): ``prefill_chunk`` is refused before the run starts (kvbench.compat).
    blockwise: ClassVar[bool] = True

    def plan(self, ctx: LayerContext) -> Tensor:
        """(H_kv, m) plan codes (EVICT=0, LOW=1, HIGH=2) for the layer's last m tokens, m = ``ctx.queries.shape[1]``
        (the whole prompt at prefill, the tokens added since the last plan while generating); earlier entries keep
        the precision they have. Only called when ``plans`` is set."""
        raise NotImplementedError(f"{type(self).__name__} sets plans but has no plan()")

    def plan_bits(self) -> tuple[int, int]:
        """(bits of HIGH entries, bits of LOW entries); 16 = full precision."""
        raise NotImplementedError(f"{type(self).__name__} sets plans but has no plan_bits()")

    def replan_interval(self) -> int:
        """plans: re-plan the newest tokens once this many were added since the last plan (0: never)."""
        return 0

    def prefill_attention(self, ctx: LayerContext, backend: str) -> Tensor:
        """(n, H_q, d) prefill attention output of a fresh layer from ``ctx.queries/keys/values`` (the new tokens).
        The engine calls ``plan(ctx)`` on the same context first (timed as compression): what the plan computed
        (ZipVL: its important tokens) is in ``ctx.memo``; the plan is applied after this attention.
        Only called when ``own_prefill_attention`` is set."""
        raise NotImplementedError(f"{type(self).__name__} sets own_prefill_attention but has no prefill_attention()")

    episodic: ClassVar[bool] = False  # several caches per context, questions routed (kvbench.episodic, EpiCache)
    # The model family the method runs on: "text" (the text engine, every LLM family; VLMs reuse it) or "var"
    # (next-scale image generators, kvbench.var). ``python -m kvbench`` routes by the model's family and refuses
    # a method of another family before anything is claimed.
    family: ClassVar[str] = "text"

    def prepare(self, model: object) -> None:
        """Called by the runner once the model is loaded, before the run directory is claimed: a method with
        per-model data (CompressKV's calibration) checks it here. Nothing by default."""
        return None

    def decode_score(self, ctx: LayerContext) -> Tensor:
        """Scores of the non-window tokens at a decode step (``ctx.queries`` is the new token's): (H_kv, n - window).

        Only called when ``decode_evict`` is set; one token per head is then evicted per step.
        """
        raise NotImplementedError(f"{type(self).__name__} sets decode_evict but has no decode_score()")

    def inputs(self) -> dict[str, str]:
        """Files beyond the config whose content determines the results (a calibration), as ``{label: sha256}``.

        Read after the runner's ``prepare(model)`` call; the run directory records them and refuses to resume
        with different ones. None by default."""
        return {}

    def probe_scores(self, queries: Tensor, layer: LayerKV, scale: float) -> Tensor:
        """Scores of a layer's cached tokens from a probe's queries (``Engine.probe``): (H_kv, max_h len_h), -inf
        past the end of each head. queries (H_q, p, d) post-RoPE."""
        raise NotImplementedError(f"{type(self).__name__} does not score with probes")

    @abstractmethod
    def score(self, ctx: LayerContext) -> Tensor:
        """Scores of the non-window tokens: (H_kv, n - ctx.window). The last ``ctx.window`` tokens are always kept.

        A method may also return (H_kv, n); then window tokens compete like any other token.
        """

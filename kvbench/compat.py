"""The one compatibility check of a run: method x allocator x protocol x prefill_chunk x model.

Used by the runner (single budgets and sweeps alike) and the lm-eval bridge, before any model is loaded or any
run directory claimed. Every rule reads capabilities the classes *declare* (``ClassVar`` flags on
:class:`~kvbench.method.Method` and :class:`~kvbench.budget.Allocator`, the fields of :class:`ModelCapabilities`),
never probes for them.

The model part is a :class:`ModelCapabilities` value: what the engine supports for a model family before the
model is loaded. Every family the adapters (``kvbench/engine/adapters.py``) know today supports everything below
(:data:`ENGINE_DEFAULT`); what needs the loaded model (an unsupported attention feature, a model whose every layer
is local) is refused by the adapter when the engine is built, still before a question is answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvbench.errors import UsageError
from kvbench.protocols import REGISTRY, SELECTABLE


@dataclass(frozen=True)
class ModelCapabilities:
    """What the engine supports for a model family.

    Attributes:
        family: shown in messages.
        ragged_blockwise_prefill: block-wise prefill (``prefill_chunk``) over per-head caches of different lengths
            (allocators with ``equal_heads = False``: adakv, head-adaptive), through the engine's left-padded
            ragged view (``kvbench/engine/view.py``); True for every family the engine has an adapter for.
    """

    family: str = "any"
    ragged_blockwise_prefill: bool = True


ENGINE_DEFAULT = ModelCapabilities()


class IncompatibleError(UsageError):
    """A method, allocator, protocol, prefill_chunk and model that cannot run together."""


def check_compatible(method: Any, allocator: Any, protocol: str, prefill_chunk: int | None,
                     model: ModelCapabilities = ENGINE_DEFAULT, episodic_supported: bool = True) -> None:
    """Raise :class:`IncompatibleError` naming the conflict and the fix, or return.

    ``method`` and ``allocator`` are the instantiated config nodes (their class flags are read);
    ``episodic_supported`` is False for front ends without the episodic protocol (the lm-eval bridge).
    """
    mname, aname = method.name or type(method).__name__, allocator.name or type(allocator).__name__
    if protocol not in SELECTABLE:
        raise IncompatibleError(f"protocol={protocol!r}; choose one of {', '.join(SELECTABLE)}")
    if method.episodic:
        if not episodic_supported:
            raise IncompatibleError(f"method={mname} builds several caches per context (episodic protocol), "
                                    "which this front end does not run; use python -m kvbench")
        if protocol != REGISTRY["episodic"].requires:
            raise IncompatibleError(f"method={mname} answers many questions over per-episode caches of one "
                                    f"context; run it with protocol={REGISTRY['episodic'].requires}")
    if prefill_chunk and not method.blockwise:
        raise IncompatibleError(f"method={mname} scores the whole prompt in one forward (image spans, hidden states "
                                "or its own prefill attention over all tokens); drop prefill_chunk")
    if prefill_chunk and not allocator.equal_heads and not model.ragged_blockwise_prefill:
        raise IncompatibleError(f"prefill_chunk needs an allocator that keeps equal per-head counts (uniform, "
                                f"pyramid) for {model.family} models; {aname} gives heads different lengths, which "
                                "cannot be re-compressed block by block yet")
    allocator.check_method(method)  # an allocator that reads one method's ctx.memo (taskkv, error_aware) refuses others

"""The one compatibility check of a run: method x allocator x protocol x prefill_chunk x model.

Used by the runner (single budgets and sweeps alike) and the lm-eval bridge, before any model is loaded or any
run directory claimed. Every rule reads capabilities the classes *declare* (``ClassVar`` flags on
:class:`~kvbench.method.Method` and :class:`~kvbench.budget.Allocator`, the fields of :class:`ModelCapabilities`),
never probes for them.

The model part is a :class:`ModelCapabilities` value. Today's engine gives every model the same capabilities
(:data:`ENGINE_DEFAULT`); the per-family model adapters (``kvbench/engine/adapters.py``) are meant to declare
them per family, and the integrator passes the adapter's value as ``model=`` here.
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
            (allocators with ``equal_heads = False``: adakv, head-adaptive); False in today's engine.
    """

    family: str = "any"
    ragged_blockwise_prefill: bool = False


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
    if prefill_chunk and allocator.cross_layer:
        raise IncompatibleError(f"prefill_chunk cannot be combined with the {aname} allocator, which allocates "
                                "across layers after the whole prompt is scored")
    if prefill_chunk and not allocator.equal_heads and not model.ragged_blockwise_prefill:
        raise IncompatibleError(f"prefill_chunk needs an allocator that keeps equal per-head counts (uniform, "
                                f"pyramid) for {model.family} models; {aname} gives heads different lengths, which "
                                "cannot be re-compressed block by block yet")
    pair = getattr(allocator, "check_method", None)  # TODO(integrator): declare Allocator.check_method in budget.py
    if pair is not None:  # an allocator that reads one method's ctx.memo (taskkv, error_aware) refuses the others
        pair(method)

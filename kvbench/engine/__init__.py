"""The KV-cache engine: ragged physical storage, attention over it, and per-layer compression at prefill."""

from kvbench.engine.context import LayerContext
from kvbench.engine.engine import Engine, select_tokens
from kvbench.engine.store import KVStore, LayerKV

__all__ = ["Engine", "KVStore", "LayerContext", "LayerKV", "select_tokens"]

"""Model adapters: the one place that knows how a model family is laid out and called.

The engine never guesses at a model's structure. A family's adapter declares which modules are the decoder's
self-attention layers, how many KV heads each has, which layers attend within a sliding window, how the
positions of new tokens are built, which config object the attention implementation is switched on (the text
config only: a vision tower keeps its own attention), and how the model is called. A model whose ``model_type``
has no adapter, or that uses an attention feature the engine does not implement, is refused with one message
naming the feature, before anything runs.

Families: ``llama`` (Llama, Mistral, Qwen2, Qwen3, SmolLM2 and other Llama-architecture checkpoints: global
causal attention, optionally Mistral's or Qwen2's sliding window) and ``gemma3`` (Gemma-3 text: 5 local
sliding-window layers per global layer, q/k norms, ``query_pre_attn_scalar`` scaling passed by the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kvbench.errors import UsageError


class UnsupportedModelError(UsageError):
    """A model (family or attention feature) the engine does not implement; the message names it."""


# model types known to need an attention feature the engine does not implement, and what that feature is
REFUSED_TYPES = {
    "deepseek_v2": "multi-head latent attention (MLA: a compressed latent KV, kv_lora_rank) of DeepSeek-V2",
    "deepseek_v3": "multi-head latent attention (MLA: a compressed latent KV, kv_lora_rank) of DeepSeek-V3",
    "gemma2": "attention logit soft-capping (attn_logit_softcapping) of Gemma-2",
    "gpt_oss": "learned attention sinks (per-head sink logits) of gpt-oss",
    "llama4": "chunked local attention (attention_chunk_size) of Llama-4",
}


@dataclass(frozen=True)
class AttentionLayer:
    """One decoder self-attention layer as the engine sees it.

    Attributes:
        index: the layer's position in the decoder (``module.layer_idx``).
        module: the attention module (its projections are what methods may read).
        n_kv_heads: KV heads of the layer's (unexpanded) cache.
        sliding_window: None for global attention; W for a local layer, where a query at position p sees the keys
            at positions p - W < k <= p (transformers' convention: W keys including itself).
    """

    index: int
    module: nn.Module
    n_kv_heads: int
    sliding_window: int | None = None


class ModelAdapter:
    """A causal decoder with RoPE applied inside attention, called with explicit 1-D position ids."""

    family: ClassVar[str] = "llama"
    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2", "qwen3")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config.get_text_config()
        self.fields = config_fields(self.config)
        check_features(self.fields)

    def attn_config(self) -> Any:
        """The config whose ``_attn_implementation`` routes the decoder's attention (never a vision tower's)."""
        return self.config

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.get_decoder().layers

    def window(self, index: int) -> int | None:
        """The sliding window of layer ``index`` as the model applies it (None: global attention)."""
        types = self.fields.get("layer_types")
        if types is not None:
            return self.fields["sliding_window"] if types[index] == "sliding_attention" else None
        return self.fields.get("sliding_window") if self.fields["model_type"] == "mistral" else None

    def attention_layers(self) -> list[AttentionLayer]:
        kv_heads = self.config.num_key_value_heads
        return [AttentionLayer(i, layer.self_attn, kv_heads, self.window(i))
                for i, layer in enumerate(self.decoder_layers())]

    def position_ids(self, start: int, n: int, device: torch.device) -> Tensor:
        """Positions of n new tokens after ``start`` logical tokens: (1, n). Eviction never shifts them."""
        return torch.arange(start, start + n, device=device)[None]

    def forward(self, ids: Tensor, position_ids: Tensor) -> Tensor:
        """Run the new tokens ids (n,); the logits of the last one, (vocab,)."""
        out = self.model(input_ids=ids[None], position_ids=position_ids, use_cache=False, logits_to_keep=1)
        return out.logits[0, -1]


class Gemma3Adapter(ModelAdapter):
    """Gemma-3 text decoders (``Gemma3ForCausalLM``): local layers attend within ``sliding_window``."""

    family: ClassVar[str] = "gemma3"
    model_types: ClassVar[tuple[str, ...]] = ("gemma3_text",)


ADAPTERS: tuple[type[ModelAdapter], ...] = (ModelAdapter, Gemma3Adapter)


def config_fields(config: Any) -> dict[str, Any]:
    """A config's fields as a dict (a family's config declares only the fields it has)."""
    return config.to_dict()


# config fields whose value (when set) is an attention feature the engine does not implement
REFUSED_FIELDS = {
    "attn_logit_softcapping": "attention logit soft-capping",
    "kv_lora_rank": "multi-head latent attention (MLA)",
    "attention_chunk_size": "chunked local attention",
}


def check_features(fields: dict[str, Any]) -> None:
    """Refuse attention features the engine does not implement, naming them (one message for all of them)."""
    model_type = fields.get("model_type")
    found = [REFUSED_TYPES[model_type]] if model_type in REFUSED_TYPES else []
    found += [f"{what} ({key}={fields[key]})" for key, what in REFUSED_FIELDS.items() if fields.get(key) is not None]
    if fields.get("use_bidirectional_attention"):
        found.append("bidirectional attention (use_bidirectional_attention=true)")
    if found:
        raise UnsupportedModelError(
            f"model type {model_type!r} uses {'; '.join(found)}, which the kvbench engine does not "
            "implement; its results would be wrong, so it is refused"
        )


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s family; one clear error for a family without one."""
    model_type = model.config.get_text_config().model_type
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    check_features(config_fields(model.config.get_text_config()))  # a known-unsupported feature names itself
    known = sorted(t for cls in ADAPTERS for t in cls.model_types)
    raise UnsupportedModelError(
        f"model type {model_type!r} has no kvbench engine adapter (supported: {', '.join(known)}); "
        "add one in kvbench/engine/adapters.py declaring its attention layers, windows and positions"
    )

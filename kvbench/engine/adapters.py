"""Model adapters: the one place that knows how a model family is laid out and called.

The engine never guesses at a model's structure. A family's adapter declares which modules are the decoder's
self-attention layers, how many KV heads each has, which layers attend within a sliding window, how the
positions of new tokens are built, which config object the attention implementation is switched on (the text
config only: a vision tower keeps its own attention), and how the model is called. A model whose ``model_type``
has no adapter, or that uses an attention feature the engine does not implement, is refused with one message
naming the feature, before anything runs.

Families: ``llama`` (Llama, Mistral, Qwen2, Qwen3, SmolLM2 and other Llama-architecture checkpoints: global
causal attention, optionally Mistral's or Qwen2's sliding window), ``gemma3`` (Gemma-3 text: 5 local
sliding-window layers per global layer, q/k norms, ``query_pre_attn_scalar`` scaling passed by the model), and the
vision-language families (:mod:`kvbench.engine.vl`): ``qwen2_vl`` (Qwen2-VL, Qwen2.5-VL: M-RoPE, 3-D positions)
and ``llava`` (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision: image features merged into a Llama / Qwen2 language
model's input embeddings, 1-D positions). A vision-language model is matched on its top-level ``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kvbench.engine.vl import TOKEN_TYPES, VisionInputs, check_no_vision_tokens, mrope_positions, token_types
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
    vision: ClassVar[bool] = False  # takes image / video inputs (matched on the top-level model_type)

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

    def positions(self, ids: Tensor, start: int, vision: VisionInputs | None) -> Tensor:
        """The position ids the model is called with for the new tokens ids (n,) after ``start`` logical tokens."""
        return self.position_ids(start, ids.numel(), ids.device)

    def forward(self, ids: Tensor, position_ids: Tensor, vision: VisionInputs | None = None) -> Tensor:
        """Run the new tokens ids (n,); the logits of the last one, (vocab,)."""
        if vision is not None:
            raise UsageError(f"a {self.family!r} text model cannot take image or video inputs")
        out = self.model(input_ids=ids[None], position_ids=position_ids, use_cache=False, logits_to_keep=1)
        return out.logits[0, -1]


class Gemma3Adapter(ModelAdapter):
    """Gemma-3 text decoders (``Gemma3ForCausalLM``): local layers attend within ``sliding_window``."""

    family: ClassVar[str] = "gemma3"
    model_types: ClassVar[tuple[str, ...]] = ("gemma3_text",)


class VisionAdapter(ModelAdapter):
    """A vision-language model: the decoder's self-attention runs through the engine, the vision tower keeps its
    own attention (the attention implementation is switched on the text config only). The pixel inputs go with the
    prompt's first forward; the model merges the vision features into the input embeddings itself."""

    vision: ClassVar[bool] = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.top = model.config
        self.vision_ids = (self.top_field("image_token_id", "image_token_index"),
                           self.top_field("video_token_id", "video_token_index"))

    def top_field(self, *names: str) -> int | None:
        """The first of ``names`` the top-level config declares (families name their token ids differently)."""
        fields = self.top.to_dict()
        return next((fields[n] for n in names if fields.get(n) is not None), None)

    def model_inputs(self, ids: Tensor, vision: VisionInputs | None) -> dict[str, Tensor]:
        """The pixel inputs of the forward (checked: a prompt's vision tokens never run without them; a decoded token
        is whatever the model generated)."""
        if vision is None:
            if ids.numel() > 1:
                check_no_vision_tokens(ids, self.vision_ids)
            return {}
        return vision.to(ids.device)

    def forward(self, ids: Tensor, position_ids: Tensor, vision: VisionInputs | None = None) -> Tensor:
        out = self.model(input_ids=ids[None], position_ids=position_ids, use_cache=False, logits_to_keep=1,
                         **self.model_inputs(ids, vision))
        return out.logits[0, -1]


class Qwen2VLAdapter(VisionAdapter):
    """Qwen2-VL and Qwen2.5-VL (and their fine-tunes: UI-TARS-1.5): M-RoPE with 3-D (t, h, w) positions.

    The prefill's positions and ``rope_deltas`` come from the model's own ``get_rope_index``; every later token is
    at its logical index + ``rope_deltas`` on all three axes (:mod:`kvbench.engine.vl`), however many entries the
    cache still holds. A prompt without vision inputs starting a fresh cache has ``rope_deltas`` 0."""

    family: ClassVar[str] = "qwen2_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl", "qwen2_5_vl")
    ROPE_KEYS: ClassVar[tuple[str, ...]] = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.rope_delta = 0

    def positions(self, ids: Tensor, start: int, vision: VisionInputs | None) -> Tensor:
        """(3, 1, n): the model's ``get_rope_index`` for a prompt with vision inputs, else index + rope_deltas."""
        if vision is None:
            self.rope_delta = 0 if start == 0 else self.rope_delta
            return mrope_positions(start, ids.numel(), self.rope_delta, ids.device)
        if start != 0:
            raise UsageError("image / video inputs must come with the first forward of a fresh cache")
        tensors = vision.to(ids.device)
        rope = {k: tensors[k] for k in self.ROPE_KEYS if k in tensors}
        if TOKEN_TYPES:  # of the whole prompt (a question may follow the context the pixel inputs came with)
            rope["mm_token_type_ids"] = token_types(ids, *self.vision_ids)
        position_ids, deltas = self.model.model.get_rope_index(ids[None], **rope)
        self.rope_delta = int(deltas.reshape(-1)[0])
        return position_ids


class LlavaAdapter(VisionAdapter):
    """LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision: image features replace the ``<image>`` tokens of a Llama / Qwen2
    language model's input embeddings; positions are 1-D (the base rule: eviction never shifts them)."""

    family: ClassVar[str] = "llava"
    model_types: ClassVar[tuple[str, ...]] = ("llava", "llava_next", "llava_onevision")


# vision-language adapters first: a LLaVA wraps a language model the text adapters would match
ADAPTERS: tuple[type[ModelAdapter], ...] = (Qwen2VLAdapter, LlavaAdapter, ModelAdapter, Gemma3Adapter)


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
    top_type, model_type = model.config.model_type, model.config.get_text_config().model_type
    wrapper = model.config.get_text_config() is not model.config  # a multimodal model around a language model
    for cls in ADAPTERS:
        if cls.vision == wrapper and (top_type if wrapper else model_type) in cls.model_types:
            return cls(model)
    if wrapper:  # its image inputs need an adapter of its own
        known = sorted(t for cls in ADAPTERS if cls.vision for t in cls.model_types)
        raise UnsupportedModelError(
            f"model type {top_type!r} (language model {model_type!r}) is a multimodal model without a kvbench engine "
            f"adapter (vision-language ones: {', '.join(known)}); its image inputs would be dropped, so it is refused"
        )
    check_features(config_fields(model.config.get_text_config()))  # a known-unsupported feature names itself
    known = sorted(t for cls in ADAPTERS for t in cls.model_types)
    raise UnsupportedModelError(
        f"model type {model_type!r} has no kvbench engine adapter (supported: {', '.join(known)}); "
        "add one in kvbench/engine/adapters.py declaring its attention layers, windows and positions"
    )

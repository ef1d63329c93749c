"""The served model's shape (``conf/serve/arch/*.yaml``): what the cost model and the KV accounting need."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvbench.errors import UsageError


@dataclass(frozen=True)
class Arch:
    """A decoder (optionally MoE, optionally with a vision encoder) by its dimensions (``dtype_bytes`` per value).

    Parameter counts are derived from the dimensions (untied embeddings, gated MLP), as Vidur does.
    """

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2
    experts: int = 0  # routed experts per MoE layer (0: dense)
    topk: int = 0
    encoder_params: float = 0.0  # vision tower parameters (EPD)
    patches_per_image: int = 0  # encoder tokens per image (its FLOPs: 2 * params * patches)
    tokens_per_image: int = 0  # LLM tokens an image becomes after the projector

    @property
    def attn_params(self) -> int:
        return 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim

    @property
    def expert_params(self) -> int:
        """One expert's gated MLP (a dense model's MLP when experts == 0)."""
        return 3 * self.hidden * self.intermediate

    @property
    def expert_bytes(self) -> int:
        return self.expert_params * self.dtype_bytes

    @property
    def active_params_per_token(self) -> int:
        """Parameters one token multiplies through in the decoder layers (top-k experts of an MoE)."""
        mlp = self.expert_params * (self.topk if self.experts else 1)
        return self.layers * (self.attn_params + mlp)

    @property
    def weight_bytes(self) -> int:
        mlp = self.expert_params * max(self.experts, 1)
        return (self.layers * (self.attn_params + mlp) + 2 * self.vocab * self.hidden) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """K (or V) of one layer for one token: what one vAttention page row holds."""
        return self.kv_heads * self.head_dim * self.dtype_bytes


def arch_from_cfg(node: Any) -> Arch:
    fields = dict(node)
    try:
        arch = Arch(**fields)
    except TypeError as err:
        raise UsageError(f"arch {fields.get('name')!r}: {err}") from None
    if min(arch.layers, arch.hidden, arch.heads, arch.kv_heads, arch.head_dim) <= 0:
        raise UsageError(f"arch {arch.name!r}: layers, hidden, heads, kv_heads and head_dim must be positive")
    return arch

"""Infinity's text-to-image next-scale transformer (FoundationVision/Infinity ``infinity/models/infinity.py``,
``basic.py``, MIT), inference only, over kvbench's KV cache.

Our own code with the released ``infinity_2b_reg.pth`` parameter and buffer names: ``cfg_uncond``, ``text_norm``,
``text_proj_for_sos.ca.{mat_q, mat_kv, v_bias, zero_k_bias, proj}``, ``text_proj_for_ca.{0, 2}``, ``pos_start``,
``lvl_embed``, ``word_embed``, ``shared_ada_lin.1``, blocks as ``block_chunks.{c}.module.{j}`` (2B: 8 chunks of 4;
``blocks.{i}`` with one chunk) with ``sa.{mat_qkv, q_bias, v_bias, zero_k_bias, scale_mul_1H11, proj}``,
``ca.{mat_q, mat_kv, v_bias, zero_k_bias, proj}``, ``ca_norm``, ``ffn.{fc1, fc2}``, ``ada_gss`` (or ``ada_lin.1``),
then ``head_nm.ada_lin.1`` and ``head``.

What differs from the authors' code (inference, on SDPA):
* Self-attention hands the scale's post-RoPE q/k/v to the ``kv`` object (``kvbench.var.cache.VarKVCache``): the
  cached keys are post-RoPE as in Infinity. Flash-attn's kernels become ``F.scaled_dot_product_attention``: the
  self-attention needs no mask at inference (block-causal by construction), the varlen text cross-attention uses a
  key-padding mask over the batch's padded text (exact), in fp32 where flash-attn casts fp32 inputs to bf16.
* RoPE uses the current scale's positions in every block. (The authors' non-fused fallback of ``CrossAttnBlock``
  omits ``scale_ind`` and so rotates every scale as if it were the first tokens; their fused path, the one the
  released models run with, passes it; we follow the fused path.)
* The cross-attention K/V of the text are computed once per generation (``cross_kv``), not at every scale: the
  same numbers, held as the condition (their bytes are counted apart from the cache).
* Training-only paths (condition dropout, drop-path, checkpointing, flex attention, fused ops) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvbench.var.infinity.rope import apply_rope
from kvbench.var.model import FFN, AdaLNBeforeHead, ScaleKV, SelfAttention, SharedAdaLin


@dataclass(frozen=True)
class InfinityConfig:
    """Hyperparameters; ``released_2b()`` gives ``infinity_2b`` (depth 32, width 2048, 16 heads, flan-t5-xl)."""

    depth: int = 32
    embed_dim: int = 2048
    num_heads: int = 16
    mlp_ratio: float = 4.0
    text_channels: int = 2048  # Ct5: the T5 encoder's d_model
    text_maxlen: int = 512
    bits: int = 32  # d: bits per token (the VAE's codebook_dim); the head predicts 2 d logits
    norm_eps: float = 1e-6
    shared_aln: bool = True
    block_chunks: int = 8
    lvl_embed_first_block_only: bool = True  # add_lvl_embeding_only_first_block
    rope_mode: int = 2  # rope2d_normalized_by_hw
    rope_base: float = 10000.0
    pool_head_dim: int = 128  # TextAttentivePool: 128 for D <= 4096 (64 above); a field so tiny models can shrink it
    n_levels: int = 15  # lvl_embed rows

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """Infinity rounds the FFN width to a multiple of 256."""
        return round(self.embed_dim * self.mlp_ratio / 256) * 256


class RMSNorm(nn.Module):
    """The authors' ``FastRMSNorm`` (``weight``)."""

    def __init__(self, c: int, eps: float) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(c))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


class CrossAttention(nn.Module):
    """Queries from the image tokens (or one learned query per head: ``pool``), keys/values from the text; no k
    bias, softmax scale 1/sqrt(d) (no cosine attention on the text)."""

    def __init__(self, dim: int, kv_dim: int, heads: int, pool: bool = False) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        if pool:
            self.mat_q = nn.Parameter(torch.zeros(1, heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(dim, dim)
        self.mat_kv = nn.Linear(kv_dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def kv(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """text (S, T, kv_dim) -> k, v (S, H, T, d): the condition's K/V."""
        bias = torch.cat([self.zero_k_bias, self.v_bias])
        k, v = F.linear(text, self.mat_kv.weight, bias).unflatten(-1, (2, self.num_heads, -1)).permute(
            2, 0, 3, 1, 4).unbind(0)
        return k, v

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """q (S, H, l, d) over k/v (S, H, T, d) with mask (S, T) True = a text token -> (S, l, C)."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=self.head_dim**-0.5)
        return self.proj(out.transpose(1, 2).flatten(2))

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor) -> Tensor:
        q = self.mat_q(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)  # (S, H, l, d)
        return self.attend(q, *kv, mask)

    def pool(self, text: Tensor, mask: Tensor) -> Tensor:
        """``TextAttentivePool``: text (S, T, Ct5) -> (S, D), one learned query per head."""
        q = self.mat_q[:, :, None].expand(text.shape[0], -1, -1, -1)  # (S, H, 1, d)
        return self.attend(q, *self.kv(text), mask)[:, 0]


class TextAttentivePool(nn.Module):
    def __init__(self, cfg: InfinityConfig) -> None:
        super().__init__()
        self.ca = CrossAttention(cfg.embed_dim, cfg.text_channels, cfg.text_channels // cfg.pool_head_dim, pool=True)

    def forward(self, text: Tensor, mask: Tensor) -> Tensor:
        return self.ca.pool(text, mask)


class RopeSelfAttention(SelfAttention):
    """VAR's cosine self-attention (same parameters) with 2-D RoPE on q and k before they reach the cache."""

    def forward(self, x: Tensor, kv: ScaleKV, rope: tuple[Tensor, Tensor]) -> Tensor:  # (S, l, C) -> (S, l, C)
        q, k, v = self.qkv(x)  # (S, H, l, d)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = kv.attend(self.block_idx, q, k, v, self.scale)
        return self.proj(out.transpose(1, 2).reshape(x.shape))


class CrossAttnBlock(nn.Module):
    """x += sa(adaLN(x)) g1; x += ca(ca_norm(x), text); x += ffn(adaLN(x)) g2 (``ca_gamma`` = 1 in the releases)."""

    def __init__(self, block_idx: int, cfg: InfinityConfig) -> None:
        super().__init__()
        c = cfg.embed_dim
        self.C, self.shared_aln = c, cfg.shared_aln
        self.sa = RopeSelfAttention(block_idx, c, cfg.num_heads, l2_norm=True)
        self.ca = CrossAttention(c, c, cfg.num_heads)
        self.ffn = FFN(c, cfg.mlp_hidden)
        self.ln_wo_grad = nn.LayerNorm(c, eps=cfg.norm_eps, elementwise_affine=False)
        self.ca_norm = nn.LayerNorm(c, eps=cfg.norm_eps)
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, c))
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))

    def modulation(self, cond: Tensor) -> tuple[Tensor, ...]:
        """The shared (S, 1, 6, C) or per-block (S, C) condition -> six (S, 1, C)."""
        if self.shared_aln:
            return (self.ada_gss + cond).unbind(2)
        return self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)

    def forward(self, x: Tensor, cond: Tensor, kv: ScaleKV, rope: tuple[Tensor, Tensor],
                text: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        g1, g2, s1, s2, b1, b2 = self.modulation(cond)
        x = x + self.sa(self.ln_wo_grad(x) * (s1 + 1) + b1, kv, rope) * g1
        x = x + self.ca(self.ca_norm(x), text[:2], text[2])
        return x + self.ffn(self.ln_wo_grad(x) * (s2 + 1) + b2) * g2


class BlockChunk(nn.Module):
    """The checkpoint's ``block_chunks.{c}.module.{j}`` level (``MultipleLayers``)."""

    def __init__(self, blocks: list[CrossAttnBlock]) -> None:
        super().__init__()
        self.module = nn.ModuleList(blocks)


class Infinity(nn.Module):
    """The transformer; ``kvbench.var.infinity.generate`` runs its next-scale loop."""

    def __init__(self, cfg: InfinityConfig) -> None:
        super().__init__()
        if cfg.depth % cfg.block_chunks:
            raise ValueError(f"depth {cfg.depth} is not a multiple of block_chunks {cfg.block_chunks}")
        self.cfg = cfg
        c, t5 = cfg.embed_dim, cfg.text_channels
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, t5))  # the unconditional "text" (CFG)
        self.text_norm = RMSNorm(t5, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(cfg)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(t5, c), nn.GELU(approximate="tanh"), nn.Linear(c, c))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, c))
        self.lvl_embed = nn.Embedding(cfg.n_levels, c)
        self.word_embed = nn.Linear(cfg.bits, c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(c, 6 * c)) if cfg.shared_aln else nn.Identity()
        blocks = [CrossAttnBlock(i, cfg) for i in range(cfg.depth)]
        if cfg.block_chunks == 1:
            self.blocks = nn.ModuleList(blocks)
        else:
            n = cfg.depth // cfg.block_chunks
            self.block_chunks = nn.ModuleList(BlockChunk(blocks[i : i + n]) for i in range(0, cfg.depth, n))
        self.layers = blocks  # a plain list (not registered twice): the blocks in order
        self.head_nm = AdaLNBeforeHead(c, cfg.norm_eps)
        self.head = nn.Linear(c, 2 * cfg.bits)

    def condition(self, text: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """T5 features (S, T, Ct5) -> sos/cond (S, D), the cross-attention input (S, T, D), the shared AdaLN
        condition (S, 1, 6, C) (or (S, D) unshared)."""
        text = self.text_norm(text)
        sos = self.text_proj_for_sos(text, mask)
        return sos, self.text_proj_for_ca(text), self.shared_ada_lin(sos)

    def cross_kv(self, ca_in: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per block, the text K/V (S, H, T, d): computed once per generation."""
        return [block.ca.kv(ca_in) for block in self.layers]

    def first_input(self, sos: Tensor) -> Tensor:
        """(S, D) -> the first scale's input (S, 1, C)."""
        return sos[:, None] + self.pos_start

    def step(self, x: Tensor, si: int, sos: Tensor, gss: Tensor, kv: ScaleKV, rope: tuple[Tensor, Tensor],
             cross: list[tuple[Tensor, Tensor]], mask: Tensor) -> Tensor:
        """One scale through every block: x (S, l, C) -> logits (S, l, 2d) fp32."""
        lvl = self.lvl_embed.weight[si]
        for i, block in enumerate(self.layers):
            if i == 0 or not self.cfg.lvl_embed_first_block_only:
                x = x + lvl
            x = block(x, gss, kv, rope, (*cross[i], mask))
        return self.head(self.head_nm(x.float(), sos.float())).float()

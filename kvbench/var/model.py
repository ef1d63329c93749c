"""VAR's next-scale transformer (FoundationVision/VAR ``models/var.py``, ``basic_var.py``, MIT), inference only.

Our own code with the checkpoint's parameter and buffer names (``class_emb``, ``pos_start``, ``pos_1LC``,
``lvl_embed``, ``word_embed``, ``blocks.{i}.attn.{mat_qkv, q_bias, v_bias, zero_k_bias, scale_mul_1H11, proj}``,
``blocks.{i}.ffn.{fc1, fc2}``, ``blocks.{i}.ada_lin.1`` (or ``ada_gss`` with ``shared_ada_lin.1``), ``head_nm``,
``head``, buffers ``lvl_1L`` and ``attn_bias_for_masking``), so ``var_d16.pth`` ... ``var_d30.pth`` load strictly.

Attention never holds its own cache: each block hands its scale's q/k/v to a ``kv`` object (``kvbench.var.cache``)
that appends the keys/values to kvbench's store and attends over everything cached (block-causal across scales,
bidirectional within one, as VAR's inference with ``attn_bias=None``). Training code (teacher forcing, dropout,
drop-path, fused kernels) is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class VARConfig:
    """Transformer hyperparameters. ``build_vae_var(depth=d)``: width 64 d, d heads, mlp 4, l2-norm attention."""

    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    vocab_size: int = 4096
    z_channels: int = 32

    @classmethod
    def released(cls, depth: int, **kw) -> VARConfig:
        """The released ``var_d{depth}.pth`` shapes (``build_vae_var``)."""
        return cls(depth=depth, embed_dim=64 * depth, num_heads=depth, **kw)

    @property
    def seq_len(self) -> int:
        return sum(p * p for p in self.patch_nums)


class ScaleKV(Protocol):
    """What a block's attention needs from the cache (``kvbench.var.cache.VarKVCache``)."""

    def attend(self, block_idx: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """q/k/v (S, H, l, d) of the current scale -> attention output (S, H, l, d) over all cached scales."""
        ...


class SelfAttention(nn.Module):
    """VAR's attention: fused qkv without k bias; with ``attn_l2_norm`` q and k are L2-normalised per head, q is
    multiplied by ``exp(min(scale_mul_1H11, log 100))`` and the softmax scale is 1 (else 0.25 / sqrt(d))."""

    def __init__(self, block_idx: int, dim: int, heads: int, l2_norm: bool) -> None:
        super().__init__()
        self.block_idx, self.num_heads, self.head_dim, self.l2_norm = block_idx, heads, dim // heads, l2_norm
        self.scale = 1.0 if l2_norm else 0.25 / math.sqrt(self.head_dim)
        if l2_norm:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (S, l, C) -> q, k, v (S, H, l, d), q/k normalised and q scaled as the model attends with them."""
        s, n, c = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(s, n, 3, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4).unbind(0)
        if self.l2_norm:
            mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()  # (1, H, 1, 1)
            q, k = F.normalize(q, dim=-1).mul(mul), F.normalize(k, dim=-1)
        return q, k, v

    def forward(self, x: Tensor, kv: ScaleKV) -> Tensor:  # (S, l, C) -> (S, l, C)
        q, k, v = self.qkv(x)
        out = kv.attend(self.block_idx, q, k, v, self.scale)  # (S, H, l, d)
        return self.proj(out.transpose(1, 2).reshape(x.shape))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNSelfAttn(nn.Module):
    """Pre-norm block whose LayerNorm scale/shift and residual gates come from the class condition:
    ``gamma1, gamma2, scale1, scale2, shift1, shift2 = ada_lin(cond)`` (6 C values)."""

    def __init__(self, block_idx: int, cfg: VARConfig) -> None:
        super().__init__()
        c = cfg.embed_dim
        self.C, self.shared_aln = c, cfg.shared_aln
        self.attn = SelfAttention(block_idx, c, cfg.num_heads, cfg.attn_l2_norm)
        self.ffn = FFN(c, round(c * cfg.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(c, eps=cfg.norm_eps, elementwise_affine=False)
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, c) / c**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))

    def modulation(self, cond: Tensor) -> tuple[Tensor, ...]:
        """cond (S, C) (or the shared (S, 1, 6, C)) -> six (S, 1, C) tensors."""
        if self.shared_aln:
            return (self.ada_gss + cond).unbind(2)
        return self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)

    def forward(self, x: Tensor, cond: Tensor, kv: ScaleKV) -> Tensor:
        g1, g2, s1, s2, b1, b2 = self.modulation(cond)
        x = x + self.attn(self.ln_wo_grad(x) * (s1 + 1) + b1, kv) * g1
        return x + self.ffn(self.ln_wo_grad(x) * (s2 + 1) + b2) * g2


class AdaLNBeforeHead(nn.Module):
    def __init__(self, c: int, eps: float) -> None:
        super().__init__()
        self.C = c
        self.ln_wo_grad = nn.LayerNorm(c, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x) * (scale + 1) + shift


class SharedAdaLin(nn.Linear):
    def forward(self, cond: Tensor) -> Tensor:  # (S, C) -> (S, 1, 6, C)
        return super().forward(cond).view(-1, 1, 6, self.weight.shape[0] // 6)


class VAR(nn.Module):
    """The transformer; ``kvbench.var.generate`` runs its next-scale loop."""

    def __init__(self, cfg: VARConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, pn = cfg.embed_dim, cfg.patch_nums
        self.word_embed = nn.Linear(cfg.z_channels, c)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, c)  # row num_classes: the null class (CFG)
        self.pos_start = nn.Parameter(torch.zeros(1, pn[0] ** 2, c))
        self.pos_1LC = nn.Parameter(torch.zeros(1, cfg.seq_len, c))
        self.lvl_embed = nn.Embedding(len(pn), c)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(c, 6 * c)) if cfg.shared_aln else nn.Identity()
        self.blocks = nn.ModuleList(AdaLNSelfAttn(i, cfg) for i in range(cfg.depth))
        levels = torch.cat([torch.full((p * p,), i) for i, p in enumerate(pn)]).view(1, cfg.seq_len, 1)
        self.register_buffer("lvl_1L", levels[:, :, 0].contiguous())  # (1, L) scale index of every token
        bias = torch.where(levels >= levels.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, cfg.seq_len, -1)
        self.register_buffer("attn_bias_for_masking", bias.contiguous())  # training mask; kept for the checkpoint
        self.head_nm = AdaLNBeforeHead(c, cfg.norm_eps)
        self.head = nn.Linear(c, cfg.vocab_size)

    def scale_positions(self) -> Tensor:
        """(1, L, C) level + position embedding of every token."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def logits(self, x: Tensor, cond: Tensor) -> Tensor:
        """(S, l, C) -> (S, l, V) in fp32."""
        return self.head(self.head_nm(x.float(), cond)).float()

    def step(self, x: Tensor, cond: Tensor, kv: ScaleKV) -> Tensor:
        """One scale through every block: x (S, l, C), cond (S, C) -> logits (S, l, V)."""
        mod = self.shared_ada_lin(cond)
        for block in self.blocks:
            x = block(x, mod, kv)
        return self.logits(x, cond)

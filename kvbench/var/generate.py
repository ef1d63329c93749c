"""VAR's next-scale sampling loop (``VAR.autoregressive_infer_cfg`` of FoundationVision/VAR), over kvbench's cache.

Step 0 feeds one start token per sample: ``class_emb(label) + pos_start + lvl/pos embedding of scale 0``, for the
2B rows of the CFG batch (rows [B, 2B) use the null class ``num_classes``). Each step si runs every block on the
pn^2 tokens of scale si (appending their K/V to the cache), mixes the logits as
``(1 + t) cond - t uncond`` with the linear ramp ``t = cfg * si / (S - 1)``, samples top-k / top-p with one seeded
``torch.Generator``, adds the sampled codes' upsampled map through Phi to ``f_hat``, and builds the next scale's
input from ``f_hat`` area-downsampled, ``word_embed``, and the next scale's embeddings. After every step the
method's compression hook cuts the cache (``kvbench.var.compress``). The VQVAE decodes ``f_hat`` to [0, 1] pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvbench.var.cache import VarKVCache
from kvbench.var.compress import VarMethod, compress_step
from kvbench.var.model import VAR
from kvbench.var.quant import VQVAE


def sample_top_k_top_p(logits: Tensor, top_k: int, top_p: float, generator: torch.Generator | None) -> Tensor:
    """logits (B, l, V) -> token ids (B, l). top_k > 0 keeps the k largest logits (ties with the k-th kept);
    top_p > 0 drops the smallest logits whose cumulative probability stays <= 1 - top_p (the largest one is always
    kept); then one multinomial draw per position from the softmax, with ``generator``."""
    b, n, v = logits.shape
    logits = logits.clone()
    if 0 < top_k < v:
        kth = logits.topk(top_k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        logits.masked_fill_(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1).view(-1, v)
    return torch.multinomial(probs, 1, replacement=True, generator=generator).view(b, n)


def cfg_logits(logits: Tensor, step: int, n_steps: int, cfg: float) -> Tensor:
    """(2B, l, V) -> (B, l, V): ``(1 + t) cond - t uncond`` with t = cfg * step / (n_steps - 1)."""
    t = cfg * step / max(1, n_steps - 1)
    b = logits.shape[0] // 2
    return (1 + t) * logits[:b] - t * logits[b:]


@dataclass
class Generation:
    """One batch's result: tokens per scale [(B, pn^2)], the final latent, the image (B, 3, H, W) in [0, 1] (None
    when not decoded) and the cache (its step records and peak bytes)."""

    tokens: list[Tensor]
    f_hat: Tensor
    image: Tensor | None
    cache: VarKVCache
    logits: list[Tensor] = field(default_factory=list)  # per scale, the guided logits (B, pn^2, V) (if kept)
    token_bits: int = 0  # bitwise tokens (Infinity): the d bits of each integer label; 0 for codebook indices


def start_tokens(var: VAR, labels: Tensor) -> tuple[Tensor, Tensor]:
    """labels (B,) -> the first scale's input (2B, first_l, C) and the condition (2B, C)."""
    null = torch.full_like(labels, var.cfg.num_classes)
    cond = var.class_emb(torch.cat([labels, null]))  # (2B, C)
    first = var.cfg.patch_nums[0] ** 2
    x = cond[:, None].expand(-1, first, -1) + var.pos_start + var.scale_positions()[:, :first]
    return x, cond


@torch.no_grad()
def generate(var: VAR, vae: VQVAE, labels: Tensor, seed: int, cfg: float = 1.5, top_k: int = 900,
             top_p: float = 0.96, method: VarMethod | None = None, budget: float = 1.0, decode: bool = True,
             keep_logits: bool = False) -> Generation:
    """Sample B = len(labels) images with one seeded generator (``seed``), compressing the cache after each step."""
    pn = var.cfg.patch_nums
    device = labels.device
    gen = torch.Generator(device=device).manual_seed(seed)
    cache = VarKVCache(var.cfg.depth, 2 * len(labels), var.cfg.num_heads, pn, synchronize=device.type == "cuda")
    states: list[dict] = [{} for _ in range(var.cfg.depth)]
    x, cond = start_tokens(var, labels)
    lvl_pos = var.scale_positions()
    f_hat = cond.new_zeros(len(labels), var.cfg.z_channels, pn[-1], pn[-1])
    tokens, kept_logits = [], []
    for si, p in enumerate(pn):
        cache.begin_step(si)
        guided = cfg_logits(var.step(x, cond, cache), si, len(pn), cfg)
        before = (cache.n_entries(), cache.nbytes())
        if method is not None:
            compress_step(cache, method, budget, var.blocks[0].attn.scale, states)
        cache.end_step(before)
        idx = sample_top_k_top_p(guided, top_k, top_p, gen)  # (B, p^2)
        tokens.append(idx)
        if keep_logits:
            kept_logits.append(guided)
        h = vae.quantize.embedding(idx).transpose(1, 2).reshape(len(labels), -1, p, p)  # (B, Cvae, p, p)
        vae.quantize.add_scale(si, f_hat, h)
        if si + 1 < len(pn):
            nxt = vae.quantize.next_input(si, f_hat).flatten(2).transpose(1, 2)  # (B, pn'^2, Cvae)
            start = cache.offset
            x = (var.word_embed(nxt) + lvl_pos[:, start : start + pn[si + 1] ** 2]).repeat(2, 1, 1)
    image = vae.fhat_to_img(f_hat) if decode else None
    return Generation(tokens, f_hat, image, cache, kept_logits)

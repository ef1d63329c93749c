"""Infinity's next-scale sampling loop (``Infinity.autoregressive_infer_cfg`` of FoundationVision/Infinity, MIT),
over kvbench's cache and compression hook.

The prompts go through the T5 encoder; the unconditional stream's text is ``cfg_uncond[:len]`` for a prompt of
``len`` tokens (Infinity's default, no negative prompt). Both streams (2B rows) are ``text_norm``-ed; the attentive
pool gives the start token / AdaLN condition ``sos``, ``text_proj_for_ca`` the cross-attention input, whose K/V
every block computes once (``Infinity.cross_kv``; bytes in ``VarKVCache.condition_bytes``). Step si runs every block
on the scale's tokens (2-D RoPE of scale si on q/k, post-RoPE keys appended to the cache), scales the logits by
1 / tau, mixes them as Infinity with ``cfg_insertion_layer=0`` (the released scripts' setting: CFG on the logits,
``cfg * cond + (1 - cfg) * uncond``, the same cfg at every scale), samples every bit (the 2d logits as d two-way
choices) with top-k / top-p and one seeded generator, adds the bits' codes to ``f_hat`` and resizes it to the next
scale's input. After every step the method's compression hook cuts the cache (``kvbench.var.compress``).

Deviations: CFG always runs the doubled batch (Infinity runs one stream when cfg = 1: the same guided logits, at
twice the cost here); the layer-insertion variants of CFG (``cfg_insertion_layer < 0``) are not implemented.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvbench.var.cache import VarKVCache
from kvbench.var.compress import VarMethod, compress_step
from kvbench.var.generate import Generation, sample_top_k_top_p
from kvbench.var.infinity.bsq import BitVAE
from kvbench.var.infinity.model import Infinity
from kvbench.var.infinity.rope import rope_tables
from kvbench.var.infinity.schedule import rope_extent
from kvbench.var.infinity.text import TextEncoder


def guided(logits: Tensor, cfg: float) -> Tensor:
    """(2B, l, V) -> (B, l, V): ``cfg * cond + (1 - cfg) * uncond``."""
    b = logits.shape[0] // 2
    return cfg * logits[:b] + (1 - cfg) * logits[b:]


def sample_bits(logits: Tensor, top_k: int, top_p: float, generator: torch.Generator) -> Tensor:
    """Bitwise head logits (B, l, 2d) -> bits (B, l, d): every bit a two-way draw (top-k / top-p over its pair)."""
    b, n, v = logits.shape
    return sample_top_k_top_p(logits.reshape(b, n * v // 2, 2), top_k, top_p, generator).view(b, n, v // 2)


def two_streams(model: Infinity, feats: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """T5 features (B, T, Ct5) -> the CFG batch (2B, T, Ct5): prompts, then ``cfg_uncond[:T]`` with the same mask."""
    uncond = model.cfg_uncond[: feats.shape[1]].to(feats.dtype).expand_as(feats) * mask[..., None]
    return torch.cat([feats, uncond]), torch.cat([mask, mask])


def condition_bytes(cross: list[tuple[Tensor, Tensor]]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in cross)


@torch.no_grad()
def generate_infinity(model: Infinity, vae: BitVAE, text: TextEncoder, prompts: list[str], seed: int,
                      cfg: float = 3.0, tau: float = 1.0, top_k: int = 900, top_p: float = 0.97,
                      method: VarMethod | None = None, budget: float = 1.0, decode: bool = True,
                      keep_logits: bool = False, h_div_w: str = "1:1") -> Generation:
    """Sample B = len(prompts) images with one seeded generator, compressing the cache after each step. Tokens
    are returned as integer labels of their d bits (most significant first)."""
    c, sides = model.cfg, vae.quantizer.sides
    device = next(model.parameters()).device
    feats, mask = text.encode(prompts)
    text_in, mask2 = two_streams(model, feats, mask)
    sos, ca_in, gss = model.condition(text_in, mask2)
    cross = model.cross_kv(ca_in)
    cache = VarKVCache(c.depth, 2 * len(prompts), c.num_heads, sides, synchronize=device.type == "cuda",
                       condition_bytes=condition_bytes(cross))
    ropes = [(a.to(device), b.to(device)) for a, b in rope_tables(c.head_dim, sides, rope_extent(h_div_w),
                                                                   c.rope_mode, c.rope_base)]
    gen = torch.Generator(device=device).manual_seed(seed)
    states: list[dict] = [{} for _ in range(c.depth)]
    x, f_hat = model.first_input(sos), sos.new_zeros(len(prompts), c.bits, sides[-1], sides[-1])
    tokens, kept_logits = [], []
    for si in range(len(sides)):
        cache.begin_step(si)
        logits = guided(model.step(x, si, sos, gss, cache, ropes[si], cross, mask2) / tau, cfg)
        before = (cache.n_entries(), cache.nbytes())
        if method is not None:
            compress_step(cache, method, budget, model.layers[0].sa.scale, states)
        cache.end_step(before)
        bits = sample_bits(logits, top_k, top_p, gen)  # (B, s^2, d)
        tokens.append(vae.quantizer.lfq.bits_to_int(bits))
        if keep_logits:
            kept_logits.append(logits)
        vae.quantizer.add_scale(si, f_hat, bits)
        if si + 1 < len(sides):
            x = model.word_embed(vae.quantizer.next_input(si, f_hat)).repeat(2, 1, 1)
    image = vae.decode(f_hat) if decode else None
    return Generation(tokens, f_hat, image, cache, kept_logits, token_bits=c.bits)

"""Write the embedded ``kvbench-tiny-var`` model: a 2-block VAR whose attention heads are written down.

    python scripts/build_tiny_var.py            # -> kvbench/assets/kvbench-tiny-var/{config.json, model.safetensors}

Deterministic (seed 0, no training): every weight is either seeded random (authors-like small init) or set by
hand so that each block has the two head kinds HACK distinguishes, plus one unforced head:

* channels [0, 16) of the residual stream carry geometry only: 12 Fourier features of a token's centre (u, v) in
  [0, 1]^2 (3 frequencies x cos/sin x 2 axes), 2 for its scale index t (the unit vector at angle t pi / 4) and a
  condition flag (the start token). Content (word/class embeddings, attention and MLP outputs) is written to
  channels [16, 64) only, so the geometry survives both blocks.
* structural head, previous scale (``prev``): q = [pos(u, v), R(-pi/4) lvl(t)], k = [pos, lvl]: a query of scale s
  attends to the spatially aligned token of scale s - 1 (multi-diagonal attention).
* structural head, aligned (``diag``): q = k = [pos, lvl]: each query attends to its own position in its own and
  neighbouring scales.
* contextual head (``vertical``): q = q_bias (the same for every query) and k reads the condition flag and content
  channels: every query attends to the same few keys (the start token and a few content-salient ones).
* one head keeps the seeded random init (``random``); the calibration decides what it is.

Head roles (block: heads 0..3): block 0 = prev, vertical, random, diag; block 1 = vertical, prev, random, diag.
The VQVAE (ch 32, ch_mult (1, 1, 1), one residual block per level, 64 codes of 8 channels) has a seeded random
encoder and codebook and a written-down smooth decoder (``write_decoder``): images are blurred colour renderings
of the latent f_hat, not natural images. Scales (1, 2, 3, 4, 6, 8): 130 tokens,
32 x 32 pixels, 10 classes (+ the null class).
"""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

import torch

from kvbench.var.load import ASSETS, build, save_embedded
from kvbench.var.model import VAR, VARConfig
from kvbench.var.quant import VAEConfig

NAME = "kvbench-tiny-var"
PN = (1, 2, 3, 4, 6, 8)
C, HEADS, D = 64, 4, 16
GEO = 16  # geometry channels [0, GEO)
POS, LVL, FLAG = slice(0, 12), slice(12, 14), 14
ROLES = (("prev", "vertical", "random", "diag"), ("vertical", "prev", "random", "diag"))
SCALE = {"prev": 40.0, "diag": 12.0, "vertical": 30.0}  # q multiplier exp(scale_mul_1H11) (<= 100)


def centres() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u, v in (0, 1) and the scale index of every token of the flattened sequence: three (L,) tensors."""
    us, vs, ts = [], [], []
    for t, p in enumerate(PN):
        grid = (torch.arange(p, dtype=torch.float64) + 0.5) / p
        us.append(grid.repeat_interleave(p))
        vs.append(grid.repeat(p))
        ts.append(torch.full((p * p,), float(t)))
    return torch.cat(us), torch.cat(vs), torch.cat(ts)


def geometry() -> tuple[torch.Tensor, torch.Tensor]:
    """pos_1LC's geometry (L, GEO) and lvl_embed's (S, GEO)."""
    u, v, t = centres()
    pos = torch.zeros(len(u), GEO, dtype=torch.float64)
    feats = [f(math.pi * k * x) for x in (u, v) for k in (1, 2, 3) for f in (torch.cos, torch.sin)]
    pos[:, POS] = torch.stack(feats, 1) * 2.0
    lvl = torch.zeros(len(PN), GEO, dtype=torch.float64)
    angle = torch.arange(len(PN), dtype=torch.float64) * math.pi / 4
    lvl[:, LVL] = torch.stack([angle.cos(), angle.sin()], 1) * 2.0 * math.sqrt(6)  # as strong as the 6 pos pairs
    return pos.float(), lvl.float()


def rotation(theta: float) -> torch.Tensor:
    return torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])


def write_head(var: VAR, block: int, head: int, role: str, g: torch.Generator) -> None:
    attn = var.blocks[block].attn
    w = attn.mat_qkv.weight.data  # (3C, C): q rows [0, C), k rows [C, 2C), v rows [2C, 3C)
    q, k = slice(head * D, head * D + D), slice(C + head * D, C + head * D + D)
    if role == "random":
        return
    w[q], w[k] = 0.0, 0.0
    attn.q_bias.data[q] = 0.0
    attn.scale_mul_1H11.data[0, head] = math.log(SCALE[role])
    if role in ("prev", "diag"):
        for i in range(12):
            w[q.start + i, i] = w[k.start + i, i] = 1.0
        if role == "prev":  # match the scale below; "diag" matches the position in any scale
            w[q.start + 12 : q.start + 14, LVL] = rotation(-math.pi / 4)
            w[k.start + 12 : k.start + 14, LVL] = torch.eye(2)
        return
    direction = torch.randn(D, generator=g)
    attn.q_bias.data[q] = direction / direction.norm() * 4.0  # every query the same: vertical stripes
    w[k, FLAG] = direction / direction.norm() * 0.3  # the start token's key points at the shared query
    w[k, GEO:] = torch.randn(D, C - GEO, generator=g) * 0.4  # content-salient keys compete with it


def init_var(var: VAR, g: torch.Generator) -> None:
    std = math.sqrt(1 / C / 3)  # the authors' automated init_std
    for name, p in var.named_parameters():
        if name.endswith(("weight", "bias")):
            p.data = torch.randn(p.shape, generator=g) * std
    for block in var.blocks:
        lin = block.ada_lin[1]
        lin.weight.data *= 0.1
        lin.bias.data.zero_()
        lin.bias.data[: 2 * C] = 1.0  # gamma1, gamma2 = 1: both residual branches open; scale, shift ~ 0
        block.attn.mat_qkv.weight.data *= 2.0
        block.attn.q_bias.data.zero_()
        block.attn.v_bias.data.zero_()
        for out in (block.attn.proj, block.ffn.fc2):  # outputs write content channels only
            out.weight.data *= 2.0
            out.weight.data[:GEO] = 0.0
            out.bias.data.zero_()
    var.head_nm.ada_lin[1].weight.data *= 0.1
    var.head_nm.ada_lin[1].bias.data.zero_()
    var.head.weight.data = torch.randn(var.head.weight.shape, generator=g) * 1.0  # peaked code logits
    var.head.bias.data.zero_()
    var.word_embed.weight.data = torch.randn(C, var.cfg.z_channels, generator=g) * 0.5
    var.word_embed.weight.data[:GEO] = 0.0  # content only
    var.word_embed.bias.data.zero_()
    var.class_emb.weight.data = torch.randn(var.class_emb.weight.shape, generator=g) * 0.5
    var.class_emb.weight.data[:, :GEO] = 0.0


def init_embeddings(var: VAR, g: torch.Generator) -> None:
    pos, lvl = geometry()
    var.pos_1LC.data = torch.randn(var.pos_1LC.shape, generator=g) * 0.02
    var.pos_1LC.data[0, :, :GEO] = pos
    var.lvl_embed.weight.data = torch.randn(var.lvl_embed.weight.shape, generator=g) * 0.02
    var.lvl_embed.weight.data[:, :GEO] = lvl
    var.pos_start.data.zero_()
    var.pos_start.data[0, :, FLAG] = 4.0


def make() -> tuple[VAR, object]:
    torch.manual_seed(0)
    var_cfg = VARConfig(depth=2, embed_dim=C, num_heads=HEADS, mlp_ratio=2.0, num_classes=10, patch_nums=PN,
                        vocab_size=64, z_channels=8)
    vae_cfg = VAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, patch_nums=PN)
    var, vae = build(var_cfg, vae_cfg)
    g = torch.Generator().manual_seed(0)
    init_var(var, g)
    init_embeddings(var, g)
    for b, roles in enumerate(ROLES):
        for h, role in enumerate(roles):
            write_head(var, b, h, role, g)
    vae.quantize.embedding.weight.data = torch.randn(64, 8, generator=g)
    write_decoder(vae, g)
    return var, vae


def centre_tap(conv: torch.nn.Conv2d, channels: int, kernel: torch.Tensor | None = None) -> None:
    """Identity (or a depthwise ``kernel``) on the first ``channels`` channels, zero elsewhere."""
    conv.weight.data.zero_()
    conv.bias.data.zero_()
    for c in range(channels):
        if kernel is None:
            conv.weight.data[c, c, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1.0
        else:
            conv.weight.data[c, c] = kernel


def write_decoder(vae, g: torch.Generator) -> None:
    """A smooth decoder (:func:`smooth_decoder`) after the last GroupNorm; Phi and post_quant_conv are identities.
    Images are then blurred renderings of f_hat, so close latents give close pixels."""
    z = vae.cfg.z_channels
    smooth_decoder(vae.decoder, z, g, 0.35)
    centre_tap(vae.post_quant_conv, z)
    for phi in vae.quantize.quant_resi.qresi_ls:
        centre_tap(phi, z)


def smooth_decoder(dec: torch.nn.Module, z: int, g: torch.Generator, gain: float) -> None:
    """Residual branches off (identity blocks), blurred nearest upsampling, and a random 1x1 mix (std ``gain``) of
    the first ``z`` channels into RGB (the VQGAN-style decoders of VAR and of the tiny Infinity)."""
    blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    centre_tap(dec.conv_in, z)
    for block in [dec.mid.block_1, dec.mid.block_2] + [b for level in dec.up for b in level.block]:
        block.conv2.weight.data.zero_()
        block.conv2.bias.data.zero_()
    for attn in [dec.mid.attn_1] + [a for level in dec.up for a in level.attn]:
        attn.proj_out.weight.data.zero_()
        attn.proj_out.bias.data.zero_()
    for level in dec.up[1:]:
        centre_tap(level.upsample.conv, dec.conv_in.out_channels, blur)
    dec.conv_out.weight.data.zero_()
    dec.conv_out.bias.data.zero_()
    dec.conv_out.weight.data[:, :z, 1, 1] = torch.randn(3, z, generator=g) * gain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ASSETS / NAME)
    out = ap.parse_args().out
    var, vae = make()
    meta = {"name": NAME, "head_roles": [list(r) for r in ROLES], "built_by": "scripts/build_tiny_var.py"}
    save_embedded(var, vae, out, meta)
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    print(f"wrote {out} ({(out / 'model.safetensors').stat().st_size / 1e6:.2f} MB, sha256 {digest[:16]})")


if __name__ == "__main__":
    main()

"""Write the embedded ``kvbench-tiny-infinity`` model: a 2-block Infinity (bitwise tokens, T5 text condition,
cross-attention, 2-D RoPE) with written-down structural and contextual heads.

    python scripts/build_tiny_infinity.py   # -> kvbench/assets/kvbench-tiny-infinity/{config.json, model.safetensors}

Deterministic (seed 0, no training). Every weight is seeded random (std sqrt(1 / 3C), the authors' init) except:

* the AdaLN of every block makes channel 0 of the attention input a constant 1 (scale1 = -1, shift1 = 1, not
  driven by the condition), so a head can have position-only queries and keys;
* structural head (``diag``): q = k = a fixed direction read from that constant channel, with its energy on the
  high- and mid-frequency RoPE pairs: after RoPE, q . k depends only on the two tokens' distance on the shared
  64 x 64 RoPE grid, so every query attends to the spatially aligned tokens of every scale (multi-diagonal);
* contextual head (``vertical``): q = q_bias only (the same for every query, on the lowest-frequency RoPE pairs,
  which barely rotate), keys from the content: every query attends to the same few keys;
* the other heads keep the seeded init (the calibration decides what they are).

Head roles (block: heads 0..3): block 0 = vertical, diag, random, random; block 1 = diag, random, vertical, random.
The tokenizer: 8 bits per token, a seeded random encoder and a written-down smooth decoder (``write_decoder``):
images are blurred colour renderings of the latent, not natural images. Text: a 2-layer T5 encoder (d_model 32)
built from a ``T5Config`` with ``ByT5Tokenizer``. Schedule: Infinity's 1:1 template, 0.06M, first 5 scales
(1, 2, 4, 6, 8): 121 tokens, 32 x 32 pixels.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

import torch
from build_tiny_var import smooth_decoder  # scripts/ is on sys.path when this file runs as a script

from kvbench.var.infinity.bsq import BitVAE, BitVAEConfig
from kvbench.var.infinity.load import build, save_embedded
from kvbench.var.infinity.model import Infinity, InfinityConfig
from kvbench.var.infinity.text import tiny_t5
from kvbench.var.load import ASSETS

NAME = "kvbench-tiny-infinity"
C, HEADS, D = 64, 4, 16
SCHEDULE = {"h_div_w": "1:1", "pn": "0.06M", "n_scales": 5}
T5 = {"vocab_size": 384, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
      "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0}
ROLES = (("vertical", "diag", "random", "random"), ("diag", "random", "vertical", "random"))
SCALE = {"diag": 15.0, "vertical": 60.0}
DIAG_CH = [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]  # RoPE pairs 0-2 (rows) and 4-6 (columns) of a head
VERT_CH = [6, 7, 14, 15]  # the lowest-frequency pair of each axis


def config() -> dict:
    cfg = InfinityConfig(depth=2, embed_dim=C, num_heads=HEADS, mlp_ratio=4.0, text_channels=T5["d_model"],
                         text_maxlen=32, bits=8, block_chunks=2, pool_head_dim=16)
    vae = BitVAEConfig(bits=8, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1)
    from dataclasses import asdict

    return {"infinity": asdict(cfg), "vae": asdict(vae), "schedule": SCHEDULE}


def init_model(model: Infinity, g: torch.Generator) -> None:
    std = math.sqrt(1 / C / 3)
    for name, p in model.named_parameters():
        p.data = torch.randn(p.shape, generator=g) * std
        if name.endswith(("norm.weight", "text_norm.weight")):
            p.data = torch.ones(p.shape)
    model.cfg_uncond.data = torch.nn.init.trunc_normal_(torch.empty(model.cfg_uncond.shape), std=1.2, generator=g)
    model.cfg_uncond.data /= model.cfg.text_channels**0.5
    lin = model.shared_ada_lin[1]
    lin.weight.data *= 0.1
    lin.bias.data.zero_()
    for block in model.layers:
        gss = block.ada_gss.data[0, 0]  # (6, C): gamma1, gamma2, scale1, scale2, shift1, shift2
        gss.zero_()
        gss[:2] = 1.0  # both residual branches open
        gss[2, 0], gss[4, 0] = -1.0, 1.0  # attention input channel 0 = 1 for every token
        for a in (block.sa, block.ca):
            a.v_bias.data.zero_()
        block.sa.q_bias.data.zero_()
        block.sa.mat_qkv.weight.data *= 2.0
    for slot in (2, 4):  # the condition does not move channel 0's scale1 / shift1
        lin.weight.data[slot * C] = 0.0
    model.head.weight.data = torch.randn(model.head.weight.shape, generator=g) * 0.3
    model.head.bias.data.zero_()
    model.word_embed.weight.data = torch.randn(model.word_embed.weight.shape, generator=g) * 0.5
    model.pos_start.data *= 10


def direction(channels: list[int], g: torch.Generator) -> torch.Tensor:
    u = torch.zeros(D)
    u[channels] = torch.randn(len(channels), generator=g).abs() + 0.5
    return u / u.norm()


def write_head(model: Infinity, block: int, head: int, role: str, g: torch.Generator) -> None:
    if role == "random":
        return
    sa = model.layers[block].sa
    w = sa.mat_qkv.weight.data  # (3C, C): q rows [0, C), k rows [C, 2C)
    q, k = slice(head * D, head * D + D), slice(C + head * D, C + head * D + D)
    w[q], w[k] = 0.0, 0.0
    sa.scale_mul_1H11.data[0, head] = math.log(SCALE[role])
    if role == "diag":
        u = direction(DIAG_CH, g)
        w[q, 0] = w[k, 0] = u  # position-only q and k: RoPE makes q . k a function of the distance
        return
    sa.q_bias.data[q] = direction(VERT_CH, g) * 4.0
    rows = torch.arange(k.start, k.stop)[VERT_CH]
    w[rows, 1:] = torch.randn(len(VERT_CH), C - 1, generator=g) * 0.5


def write_decoder(vae: BitVAE, g: torch.Generator) -> None:
    """Smooth decoder: identity residual blocks, blurred upsampling, a random 1 x 1 mix of the bits into RGB."""
    smooth_decoder(vae.decoder, vae.cfg.bits, g, 0.6)


def make() -> tuple[Infinity, BitVAE, object]:
    torch.manual_seed(0)
    model, vae, _ = build(config())
    t5 = tiny_t5(T5)  # transformers' init under the global seed 0; the weights are stored, not rebuilt
    g = torch.Generator().manual_seed(0)
    init_model(model, g)
    for b, roles in enumerate(ROLES):
        for h, role in enumerate(roles):
            write_head(model, b, h, role, g)
    write_decoder(vae, g)
    return model, vae, t5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ASSETS / NAME)
    out = ap.parse_args().out
    model, vae, t5 = make()
    meta = {"name": NAME, "head_roles": [list(r) for r in ROLES], "built_by": "scripts/build_tiny_infinity.py"}
    save_embedded(model, vae, t5, SCHEDULE, out, meta)
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    print(f"wrote {out} ({(out / 'model.safetensors').stat().st_size / 1e6:.2f} MB, sha256 {digest[:16]})")


if __name__ == "__main__":
    main()

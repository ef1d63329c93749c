"""Infinity's bitwise tokens: the multi-scale binary spherical quantiser (BSQ) and a VAE around it
(FoundationVision/Infinity ``infinity/models/bsq_vae/multiscale_bsq.py``, MIT), inference path.

A token is d bits (one bit-plane per latent channel): bits b in {0, 1}^d map to the code
``l2norm(b * 2s - s)`` with s = 1 / sqrt(d) (a corner of the unit sphere). The transformer's head predicts 2 logits
per bit (the bitwise classifier: 2d outputs per token) and the sampler draws each bit independently. Scale si's
code map (B, d, h, w) is upsampled to the final size (trilinear in the authors' 3-D code, i.e. bilinear on images;
the last scale is added as is) and summed into ``f_hat``; the next scale's input is ``f_hat`` resized to the next
size with the same (bilinear) mode, as Infinity's inference does. ``f_to_bits`` is the encoder side (residual sign
quantisation with area downsampling), used by the tiny model's builder and tests.

Bitwise self-correction (Infinity's training trick: flip a fraction of the bits of the teacher-forced scales and
re-quantise, so the model learns to correct its own errors) only changes training; ``flip_bits`` implements the
flip for completeness and the builder's tests, not the inference path.

``BitVAE``: the encoder / decoder of ``kvbench.var.vae`` on the d-channel latent. The released tokenizer
(``infinity_vae_d32_reg.pth``, the authors' ``bsq_vae/flux_vqgan.py``) is that same latent-diffusion conv
autoencoder in its image configuration (2-D convs, ``cnn_attention='no'``: no self-attention anywhere; base 128
channels, ch_mult (1, 2, 4, 4, 4), 2 blocks, GroupNorm(32, 1e-6), SiLU, nearest-2x upsampling then a 3x3 conv,
right/bottom-padded stride-2 downsampling): :func:`released_vae_config` reads that configuration off a checkpoint's
shapes and :func:`released_vae_state` maps its names onto ours (the authors wrap every conv and norm in a module,
``conv1.conv.weight`` / ``norm1.norm.weight``; their loader takes either form, and so do we). The tiny model keeps
self-attention in the middle and the lowest level (``attention``, VAR's layout). The quantiser's buffer is named as
the authors' (``quantizer.lfq.mask``: the bit weights 2^(d-1) ... 1, for integer labels); the image is
``(clamp(decode, -1, 1) + 1) / 2``, as Infinity's ``autoregressive_infer`` returns it before the BGR flip.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvbench.errors import UsageError
from kvbench.var.vae import Decoder, Encoder


class BSQ(nn.Module):
    """Bits <-> codes (the authors' ``lfq``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim, self.codebook_scale = dim, dim**-0.5
        self.register_buffer("mask", 2 ** torch.arange(dim - 1, -1, -1))

    def bits_to_codes(self, bits: Tensor) -> Tensor:
        """(..., d) {0, 1} -> (..., d) unit-norm codes +-1/sqrt(d)."""
        return F.normalize(bits.float() * self.codebook_scale * 2 - self.codebook_scale, dim=-1)

    def bits_to_int(self, bits: Tensor) -> Tensor:
        """(..., d) bits -> (...,) integer labels (most significant bit first)."""
        return (bits.long() * self.mask).sum(-1)


class MultiScaleBSQ(nn.Module):
    """The residual multi-scale quantiser over a schedule of square scales ``sides``."""

    def __init__(self, dim: int, sides: tuple[int, ...]) -> None:
        super().__init__()
        self.sides = sides
        self.lfq = BSQ(dim)

    def codes(self, bits: Tensor, side: int) -> Tensor:
        """(B, side^2, d) bits -> (B, d, side, side) code map."""
        return self.lfq.bits_to_codes(bits).transpose(1, 2).unflatten(2, (side, side))

    def add_scale(self, si: int, f_hat: Tensor, bits: Tensor) -> Tensor:
        """f_hat (B, d, P, P) += the scale's codes upsampled to P (the last scale as is), in place."""
        h = self.codes(bits, self.sides[si])
        if si != len(self.sides) - 1:
            h = F.interpolate(h, size=f_hat.shape[-2:], mode="bilinear")
        return f_hat.add_(h)

    def next_input(self, si: int, f_hat: Tensor) -> Tensor:
        """The next scale's input (B, side'^2, d): f_hat resized (bilinear) to the next side, flattened."""
        s = self.sides[si + 1]
        return F.interpolate(f_hat, size=(s, s), mode="bilinear").flatten(2).transpose(1, 2)

    def f_to_bits(self, f: Tensor) -> list[Tensor]:
        """Encoder features (B, d, P, P) -> per-scale bits [(B, side^2, d)] by residual sign quantisation."""
        f_hat, out = torch.zeros_like(f), []
        for si, s in enumerate(self.sides):
            rest = f - f_hat
            z = F.interpolate(rest, size=(s, s), mode="area") if si != len(self.sides) - 1 else rest
            bits = (z > 0).long().flatten(2).transpose(1, 2)  # (B, s^2, d)
            self.add_scale(si, f_hat, bits)
            out.append(bits)
        return out


def flip_bits(bits: Tensor, rate: float, generator: torch.Generator) -> Tensor:
    """Bitwise self-correction's corruption: each bit flipped with probability ``rate`` (training only)."""
    flip = torch.rand(bits.shape, generator=generator, device=bits.device) < rate
    return torch.where(flip, 1 - bits, bits)


@dataclass(frozen=True)
class BitVAEConfig:
    """The d-bit tokenizer: ``bits`` latent channels, the conv autoencoder of ``kvbench.var.vae`` (``attention``:
    self-attention in the middle and at the lowest level, as VAR's; the released Infinity tokenizer has none)."""

    bits: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attention: bool = True

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class BitVAE(nn.Module):
    """``encoder``, ``quantizer`` (``lfq.mask``), ``decoder``."""

    def __init__(self, cfg: BitVAEConfig, sides: tuple[int, ...]) -> None:
        super().__init__()
        self.cfg = cfg
        kw = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks, z_channels=cfg.bits,
                  using_sa=cfg.attention, using_mid_sa=cfg.attention)
        self.encoder, self.decoder = Encoder(**kw), Decoder(**kw)
        self.quantizer = MultiScaleBSQ(cfg.bits, sides)

    def decode(self, f_hat: Tensor) -> Tensor:
        """(B, d, P, P) -> image (B, 3, P * down, P * down) in [0, 1]."""
        return self.decoder(f_hat).clamp(-1, 1).add(1).mul(0.5)

    def img_to_bits(self, img: Tensor) -> list[Tensor]:
        """Image (B, 3, H, W) in [-1, 1] -> per-scale bits."""
        return self.quantizer.f_to_bits(self.encoder(img))


def released_vae_config(state: dict[str, Tensor]) -> BitVAEConfig:
    """The configuration of a released Infinity tokenizer, read off its decoder's shapes (either naming): bits =
    ``conv_in``'s input channels, one level per ``decoder.up.<i>``, ``ch * ch_mult[i]`` = that level's output
    channels, ``num_res_blocks`` = its blocks - 1, attention iff ``decoder.mid.attn_1`` exists."""
    def weight(name: str) -> Tensor:
        return state.get(f"decoder.{name}.weight", state.get(f"decoder.{name}.conv.weight"))

    if weight("conv_in") is None:
        raise UsageError("not an Infinity tokenizer state dict: no decoder.conv_in weight (expected the 'vae' entry "
                         "of infinity_vae_d32_reg.pth)")
    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("decoder.up.")})
    outs = [weight(f"up.{i}.block.0.conv1").shape[0] for i in levels]
    blocks = {int(k.split(".")[4]) for k in state if k.startswith("decoder.up.0.block.")}
    return BitVAEConfig(bits=weight("conv_in").shape[1], ch=outs[0], ch_mult=tuple(o // outs[0] for o in outs),
                        num_res_blocks=len(blocks) - 1,
                        attention=any(k.startswith("decoder.mid.attn_1.") for k in state))


def released_vae_state(state: dict[str, Tensor], vae: BitVAE) -> dict[str, Tensor]:
    """A released tokenizer's state dict under our names: the authors' ``<conv>.conv.<p>`` / ``<norm>.norm.<p>``
    wrappers unwrapped (names already ours are kept); a name that is neither is left as is, so the strict load
    names it."""
    ours = set(vae.state_dict())
    out = {}
    for key, value in state.items():
        head, _, param = key.rpartition(".")
        unwrapped = head.rpartition(".")[0] + "." + param if head.endswith((".conv", ".norm")) else key
        out[key if key in ours or unwrapped not in ours else unwrapped] = value
    return out

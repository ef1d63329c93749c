"""Optional: kvbench's Infinity against the authors' code on the same weights (skipped without a checkout).

    KVBENCH_INFINITY_REFERENCE=/path/to/FoundationVision-Infinity pytest tests/test_infinity_reference.py

The authors' modules need flash-attn and timm, which do not install here: the test stubs flash-attn's varlen
kv-packed kernel with per-sequence SDPA and timm's ``register_model`` / ``DropPath`` (identity at inference), gives
their ``TextAttentivePool`` the tiny model's pool head dim (16; 128 is hard-coded there), turns their fp32 -> bf16
cast before that kernel off (our documented deviation), and runs their fused-norm block path (the one that passes
``scale_ind`` to RoPE) with their ``fused_ada_layer_norm`` formula uncompiled. Their bits are read through a small
tokenizer shim (BSQ codes ``l2norm(2 b s - s)``; ``decode`` returns the summed codes). Run once at 4c27bbb: the
state dicts load strictly both ways and every sampled bit agreed over 3 seeds x 2 (cfg, tau), f_hat within 2.4e-7.
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kvbench.var.infinity.bsq import BitVAE, BitVAEConfig
from kvbench.var.infinity.generate import generate_infinity
from kvbench.var.infinity.load import load_embedded
from kvbench.var.infinity.schedule import scale_sides

REF = os.environ.get("KVBENCH_INFINITY_REFERENCE")
pytestmark = [pytest.mark.skipif(not REF, reason="set KVBENCH_INFINITY_REFERENCE to a FoundationVision/Infinity "
                                 "checkout"), pytest.mark.usefixtures("one_thread")]


def varlen_sdpa(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0, softmax_scale=None):
    """flash-attn's ``flash_attn_varlen_kvpacked_func``: q (Nq, H, d), kv (Nk, 2, H, d), one sequence at a time."""
    out = []
    for i in range(len(cu_seqlens_q) - 1):
        qi = q[cu_seqlens_q[i] : cu_seqlens_q[i + 1]].transpose(0, 1)
        ki, vi = kv[cu_seqlens_k[i] : cu_seqlens_k[i + 1]].unbind(1)
        out.append(F.scaled_dot_product_attention(qi, ki.transpose(0, 1), vi.transpose(0, 1),
                                                  scale=softmax_scale).transpose(0, 1))
    return torch.cat(out)


def stub_modules(monkeypatch) -> None:
    flash = types.ModuleType("flash_attn")
    flash.flash_attn_func = lambda q, k, v, dropout_p=0.0, softmax_scale=None: None
    flash.flash_attn_varlen_kvpacked_func = varlen_sdpa
    timm, models, layers, loss = (types.ModuleType(n) for n in ("timm", "timm.models", "timm.models.layers",
                                                                "timm.loss"))
    models.register_model = lambda f: f
    layers.DropPath = type("DropPath", (nn.Identity,), {"__init__": lambda self, *a, **k: nn.Identity.__init__(self)})
    layers.drop_path = lambda x, *a, **k: x
    loss.SoftTargetCrossEntropy = nn.Module
    for name, mod in {"flash_attn": flash, "timm": timm, "timm.models": models, "timm.models.layers": layers,
                      "timm.loss": loss}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.syspath_prepend(REF)


class Fp32Torch(types.ModuleType):
    """``torch`` for their basic.py with ``torch.bfloat16`` = float32: their cast before flash-attn is a no-op."""

    def __getattr__(self, name: str):
        return torch.float32 if name == "bfloat16" else getattr(torch, name)


class Lfq(nn.Module):
    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("mask", 2 ** torch.arange(bits - 1, -1, -1))

    def indices_to_codes(self, idx, label_type):  # (B, 1, h, w, d) bits -> (B, d, 1, h, w) BSQ codes
        s = self.bits**-0.5
        return F.normalize(idx.float() * 2 * s - s, dim=-1).permute(0, 4, 1, 2, 3)


class TokenizerShim(nn.Module):
    def __init__(self, bits: int) -> None:
        super().__init__()
        self.embed_dim, self.vocab_size = bits, 2**bits
        self.quantizer = nn.Module()
        self.quantizer.lfq, self.quantizer.z_interplote_up = Lfq(bits), "trilinear"

    def decode(self, z):
        self.z = z.clone()
        return z


def their_model(ours, shim, monkeypatch):
    import infinity.models.basic as basic
    import infinity.models.infinity as their

    monkeypatch.setattr(basic, "torch", Fp32Torch("torch"))
    c = ours.cfg
    heads = c.text_channels // c.pool_head_dim

    class Pool(nn.Module):
        def __init__(self, ct5, d):
            super().__init__()
            self.ca = basic.CrossAttention(for_attn_pool=True, embed_dim=d, kv_dim=ct5, num_heads=heads)

        def forward(self, ca_kv):
            return self.ca(None, ca_kv).squeeze(1)

    monkeypatch.setattr(their, "TextAttentivePool", Pool)
    model = their.Infinity(shim, text_channels=c.text_channels, text_maxlen=c.text_maxlen, embed_dim=c.embed_dim,
                           depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, shared_aln=True,
                           customized_flash_attn=False, fused_norm=False, pad_to_multiplier=1, use_flex_attn=False,
                           add_lvl_embeding_only_first_block=1, use_bit_label=1, rope2d_each_sa_layer=1,
                           rope2d_normalized_by_hw=2, pn="0.06M", inference_mode=True, train_h_div_w_list=[1.0],
                           block_chunks=c.block_chunks).eval()

    def ada_ln(C, eps, x, scale, shift):  # their fused_ada_layer_norm, uncompiled
        return F.layer_norm(x.float(), (C,), eps=eps).mul(scale.add(1)).add_(shift)

    for block in [*model.unregistered_blocks, model.head_nm]:
        block.fused_norm_func = ada_ln
    return model


def test_bit_identical_samples_to_the_authors_code(monkeypatch) -> None:
    stub_modules(monkeypatch)
    ours, _, text = load_embedded("kvbench-tiny-infinity")
    sides = scale_sides("1:1", "0.06M")  # their RoPE tables know the full schedules only (7 scales)
    vae = BitVAE(BitVAEConfig(bits=ours.cfg.bits, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1), sides).eval()
    shim = TokenizerShim(ours.cfg.bits)
    theirs = their_model(ours, shim, monkeypatch)
    assert set(theirs.state_dict()) == set(ours.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    prompts = ["a red cube on a table", "a photo of a cat sitting on a sofa"]
    feats, mask = text.encode(prompts)
    lens = mask.sum(1).tolist()
    label = (torch.cat([feats[i, :n] for i, n in enumerate(lens)]), lens,
             F.pad(mask.sum(1).to(torch.int32).cumsum(0), (1, 0)).to(torch.int32), max(lens))
    for seed, cfg, tau in ((0, 4.0, 0.5), (7, 3.0, 1.0)):
        out = generate_infinity(ours, vae, text, prompts, seed=seed, cfg=cfg, tau=tau, top_k=900, top_p=0.97)
        with torch.no_grad():
            theirs.autoregressive_infer_cfg(vae=shim, scale_schedule=[(1, s, s) for s in sides], label_B_or_BLT=label,
                                            B=2, g_seed=seed, cfg_list=[cfg] * 7, tau_list=[tau] * 7, top_k=900,
                                            top_p=0.97, returns_vemb=1, cfg_insertion_layer=[0], vae_type=8,
                                            ret_img=True, inference_mode=True)
        assert (shim.z - out.f_hat).abs().max() < 1e-5, "every sampled bit the same"

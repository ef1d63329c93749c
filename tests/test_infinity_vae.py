"""Infinity's released tokenizer (infinity_vae_d32_reg.pth): its names and shapes written down from the authors'
modules (``bsq_vae/flux_vqgan.py``: every conv and norm wrapped, ``conv1.conv.weight``), loaded strictly into our
``BitVAE``, and decoded as an independent functional reference of the authors' forward does."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kvbench.errors import UsageError
from kvbench.var.infinity.bsq import BitVAE, BitVAEConfig, released_vae_config, released_vae_state
from kvbench.var.infinity.load import load_infinity, load_released_vae

pytestmark = pytest.mark.usefixtures("one_thread")


def resnet_keys(p: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    keys = {f"{p}.norm1.norm.weight": (cin,), f"{p}.norm1.norm.bias": (cin,),
            f"{p}.conv1.conv.weight": (cout, cin, 3, 3), f"{p}.conv1.conv.bias": (cout,),
            f"{p}.norm2.norm.weight": (cout,), f"{p}.norm2.norm.bias": (cout,),
            f"{p}.conv2.conv.weight": (cout, cout, 3, 3), f"{p}.conv2.conv.bias": (cout,)}
    if cin != cout:
        keys |= {f"{p}.nin_shortcut.conv.weight": (cout, cin, 1, 1), f"{p}.nin_shortcut.conv.bias": (cout,)}
    return keys


def conv_keys(p: str, cout: int, cin: int, k: int = 3) -> dict[str, tuple[int, ...]]:
    return {f"{p}.conv.weight": (cout, cin, k, k), f"{p}.conv.bias": (cout,)}


def authors_keys(bits: int, ch: int, mult: tuple[int, ...], blocks: int) -> dict[str, tuple[int, ...]]:
    """The authors' AutoEncoder state dict (image config: cnn_type 2d, cnn_attention 'no', use_vae False;
    patch_size = 2^(levels-1)), from their Encoder / Decoder constructors."""
    keys, last = {"quantizer.lfq.mask": (bits,)}, len(mult) - 1
    keys |= conv_keys("encoder.conv_in", ch, 3)
    cin = ch
    for i, m in enumerate(mult):
        for b in range(blocks):
            keys |= resnet_keys(f"encoder.down.{i}.block.{b}", cin, ch * m)
            cin = ch * m
        if i < last:  # i_level < log2(patch_size)
            keys |= conv_keys(f"encoder.down.{i}.downsample.conv", cin, cin)
    for side in ("encoder", "decoder"):
        c = ch * mult[-1]
        keys |= resnet_keys(f"{side}.mid.block_1", c, c) | resnet_keys(f"{side}.mid.block_2", c, c)
    keys |= {"encoder.norm_out.norm.weight": (cin,), "encoder.norm_out.norm.bias": (cin,)}
    keys |= conv_keys("encoder.conv_out", bits, cin)
    cin = ch * mult[-1]
    keys |= conv_keys("decoder.conv_in", cin, bits)
    for i in reversed(range(len(mult))):
        for b in range(blocks + 1):
            keys |= resnet_keys(f"decoder.up.{i}.block.{b}", cin, ch * mult[i])
            cin = ch * mult[i]
        if i >= 1:  # 1 <= i_level <= log2(patch_size)
            keys |= conv_keys(f"decoder.up.{i}.upsample.conv", cin, cin)
    keys |= {"decoder.norm_out.norm.weight": (cin,), "decoder.norm_out.norm.bias": (cin,)}
    return keys | conv_keys("decoder.conv_out", 3, cin)


def random_state(keys: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in keys.items():
        if k.endswith("mask"):
            out[k] = 2 ** torch.arange(shape[0] - 1, -1, -1)
        elif ".norm." in k:
            out[k] = 1 + 0.1 * torch.randn(shape, generator=g) if k.endswith("weight") else 0.1 * torch.randn(
                shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            out[k] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return out


def test_the_released_d32_tokenizer_config_and_names_load_into_ours() -> None:
    keys = authors_keys(32, 128, (1, 2, 4, 4, 4), 2)
    meta = {k: torch.empty(s, device="meta") for k, s in keys.items()}
    cfg = released_vae_config(meta)
    assert cfg == BitVAEConfig(bits=32, ch=128, ch_mult=(1, 2, 4, 4, 4), num_res_blocks=2, attention=False)
    with torch.device("meta"):
        vae = BitVAE(cfg, (1, 2, 4))
    mapped = released_vae_state(meta, vae)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert cfg.downsample == 16  # 64 x 64 tokens -> 1024 px (pn 1M)


def reference_decode(s: dict[str, torch.Tensor], z: torch.Tensor, levels: int, blocks: int) -> torch.Tensor:
    """The authors' Decoder._forward written out on their tensors: conv_in, mid, up levels high to low (nearest 2x
    then conv at levels >= 1), norm_out, swish, conv_out; then clamp and (x + 1) / 2."""
    def conv(p: str, x: torch.Tensor) -> torch.Tensor:
        w = s[f"{p}.conv.weight"]
        return F.conv2d(x, w, s[f"{p}.conv.bias"], padding=w.shape[-1] // 2)

    def norm(p: str, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, 32, s[f"{p}.norm.weight"], s[f"{p}.norm.bias"], eps=1e-6)

    def resnet(p: str, x: torch.Tensor) -> torch.Tensor:
        h = conv(f"{p}.conv2", F.silu(norm(f"{p}.norm2", conv(f"{p}.conv1", F.silu(norm(f"{p}.norm1", x))))))
        return (conv(f"{p}.nin_shortcut", x) if f"{p}.nin_shortcut.conv.weight" in s else x) + h

    h = resnet("decoder.mid.block_2", resnet("decoder.mid.block_1", conv("decoder.conv_in", z)))
    for i in reversed(range(levels)):
        for b in range(blocks + 1):
            h = resnet(f"decoder.up.{i}.block.{b}", h)
        if i >= 1:
            h = conv(f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2, mode="nearest"))
    h = conv("decoder.conv_out", F.silu(norm("decoder.norm_out", h)))
    return (h.clamp(-1, 1) + 1) / 2


@pytest.mark.parametrize("flat", [False, True], ids=["authors-wrapped-names", "flat-names"])
def test_a_small_released_tokenizer_file_decodes_as_the_authors_decoder(tmp_path, flat: bool) -> None:
    keys = authors_keys(8, 32, (1, 2, 2), 1)
    state = random_state(keys)
    saved = state
    if flat:  # the FLUX-style plain names (conv_in.weight, norm1.weight): the authors' loader takes these too
        saved = {k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias").replace(".norm.weight", ".weight")
                 .replace(".norm.bias", ".bias") if ".upsample." not in k else k.replace(".conv.conv.", ".conv."): v
                 for k, v in state.items()}
    torch.save({"vae": saved}, tmp_path / "vae.pth")
    vae = load_released_vae(str(tmp_path / "vae.pth"), (1, 2, 4))
    assert vae.cfg == BitVAEConfig(bits=8, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attention=False)
    z = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = vae.decode(z)
    assert ours.shape == (2, 3, 16, 16)
    torch.testing.assert_close(ours, reference_decode(state, z, levels=3, blocks=1), rtol=1e-5, atol=1e-5)


def test_a_wrong_tokenizer_file_and_a_missing_one_are_one_clear_error(tmp_path) -> None:
    keys = authors_keys(8, 32, (1, 2), 1)
    state = random_state(keys)
    state["decoder.extra.weight"] = torch.zeros(1)
    torch.save({"vae": state}, tmp_path / "bad.pth")
    with pytest.raises(UsageError, match="not an Infinity tokenizer kvbench can load.*decoder.extra"):
        load_released_vae(str(tmp_path / "bad.pth"), (1, 2))
    torch.save({"vae": {"foo": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(UsageError, match="no decoder.conv_in"):
        load_released_vae(str(tmp_path / "other.pth"), (1, 2))
    (tmp_path / "infinity_2b_reg.pth").write_bytes(b"")
    spec = OmegaConf.create({"pretrained": str(tmp_path / "infinity_2b_reg.pth"), "vae": None})
    with pytest.raises(UsageError, match="tokenizer None not found.*model.vae"):
        load_infinity(spec)

"""The quantised layer store and method=kivi: packing, error bounds, bytes, KIVI's residual flushes, per-token
plans, decode logits against an independent dequantise-then-attend reference, and the clear errors."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import pytest
import torch
from conftest import ARCHS, HEAD_DIM, N_KV_HEADS, N_LAYERS, load_method
from torch import Tensor
from transformers import AttentionInterface

from kvbench.budget import Pyramid, Uniform
from kvbench.engine import Engine, KVStore
from kvbench.engine.packed import FULL, grid, pack, quantize_block, unpack
from kvbench.engine.quant import EVICT, HIGH, LOW, QuantLayerKV, QuantSpec
from kvbench.errors import UsageError
from methods.fullkv import FullKV
from methods.kivi import KIVI


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def all_at(bits: int, h: int, n: int, d: int, group: int = 32, dtype: torch.dtype = torch.float32, seed: int = 0
           ) -> tuple[QuantLayerKV, Tensor, Tensor]:
    """A layer of h heads x n tokens whose keys and values are all quantised at ``bits`` by a plan."""
    k, v = rand(h, n, d, seed=seed, dtype=dtype), rand(h, n, d, seed=seed + 1, dtype=dtype)
    layer = QuantLayerKV.from_dense(k, v, torch.arange(n), QuantSpec(group=group, residual=None))
    layer.apply_plan(torch.full((h, n), LOW, dtype=torch.int8), bits_high=FULL, bits_low=bits)
    return layer, k, v


# -- packing --------------------------------------------------------------------------------------------------------
def test_pack_hand_made_codes():
    two = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0]])
    assert pack(two, 2).tolist() == [[0 | 1 << 2 | 2 << 4 | 3 << 6, 3 | 2 << 2 | 1 << 4 | 0 << 6]] == [[228, 27]]
    four = torch.tensor([[1, 2, 15, 0], [7, 8, 0, 15]])
    assert pack(four, 4).tolist() == [[0x21, 0x0F], [0x87, 0xF0]]
    eight = torch.tensor([[0, 255, 17, 128]])
    assert pack(eight, 8).tolist() == eight.tolist()
    for codes, bits in ((two, 2), (four, 4), (eight, 8)):
        packed = pack(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape[1] == codes.shape[1] * bits // 8
        assert torch.equal(unpack(packed, bits).long(), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_random_codes_exact(bits):
    codes = torch.randint(0, 2**bits, (37, 64), generator=torch.Generator().manual_seed(bits))
    assert torch.equal(unpack(pack(codes, bits), bits).long(), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_reads_any_layout_and_integer_type(bits):
    codes = torch.randint(0, 2**bits, (40, 64), generator=torch.Generator().manual_seed(bits))
    want = pack(codes, bits)
    assert torch.equal(pack(codes.T.contiguous().T, bits), want), "a transposed (non-contiguous) view"
    assert torch.equal(pack(codes.to(torch.uint8), bits), want) and torch.equal(pack(codes.float(), bits), want)
    odd = torch.randint(0, 2**bits, (40, 65), generator=torch.Generator().manual_seed(1))[:, 1:]  # offset storage
    assert torch.equal(unpack(pack(odd, bits), bits).long(), odd)


def reference_block(x: Tensor, heads: Tensor, bits: int, group: int, per_channel: bool, dtype: torch.dtype
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """quantize_block written as a loop over groups: keys per channel over ``group`` consecutive rows of a head,
    values per row over channel groups -> codes (m, d), scale, zero, param (the scale row of each row)."""
    x = x.float()
    if per_channel:
        members = [idx[s : s + group] for h in heads.unique() for idx in [(heads == h).nonzero().squeeze(1)]
                   for s in range(0, len(idx), group)]
        axis = 0
    else:
        width = min(group, x.shape[1])
        members = [(r, slice(c, c + width)) for r in range(len(x)) for c in range(0, x.shape[1], width)]
        axis = -1
    codes, scales, zeros, param = torch.zeros_like(x), [], [], torch.zeros(len(x), dtype=torch.long)
    for p, where in enumerate(members):
        block = x[where]
        zero, scale = grid(block.amin(axis), block.amax(axis), bits, dtype)
        safe = torch.where(scale > 0, scale.float(), 1.0)
        codes[where] = ((block - zero.float()) / safe).round().clamp(0, 2**bits - 1)
        scales.append(scale), zeros.append(zero)
        if per_channel:
            param[where] = p
        else:
            param[where[0]] = where[0]
    scale, zero = torch.stack(scales), torch.stack(zeros)
    if not per_channel:  # one row of (d / width) scales per token
        scale, zero = scale.view(len(x), -1), zero.view(len(x), -1)
    return codes, scale, zero, param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [1, 8, 32])
@pytest.mark.parametrize("per_channel", [True, False], ids=["keys", "values"])
def test_quantize_block_matches_a_per_group_loop(per_channel, group, bits, dtype):
    """Ragged heads (one empty, short last groups), rows taken out of order from a larger source, constant
    groups: the padded-group layout gives the codes, scales and zero points of a plain loop over groups."""
    gen = torch.Generator().manual_seed(bits * group)
    counts = torch.tensor([37, 0, 8, 70])
    heads = torch.repeat_interleave(torch.arange(4), counts)  # head-major, token order
    source = (3 * torch.randn(200, 32, generator=gen)).to(dtype)
    source[::4] = source[:, 0] = 1.5  # constant rows and a constant channel: constant value and key groups
    rows = torch.randperm(200, generator=gen)[: len(heads)]
    block = quantize_block(source, rows, heads, 4, bits, group, per_channel, dtype)
    codes, scale, zero, param = reference_block(source[rows], heads, bits, group, per_channel, dtype)
    assert torch.equal(unpack(block.codes, bits).long(), codes.long())
    assert torch.equal(block.scale, scale) and torch.equal(block.zero, zero) and torch.equal(block.param, param)
    assert block.scale.dtype == dtype and (block.scale == 0).any(), "constant groups have scale 0"


# -- round-trip error ------------------------------------------------------------------------------------------------
def test_key_and_value_groups_hand_made():
    """One head, 4 tokens (one key group), 4 channels (one value group), 2 bits: scale = (max - min) / 3."""
    k = torch.tensor([[[0.0, 0.0, 0, 0], [1.0, 0.5, 0, 0], [2.0, 1.4, 0, 0], [3.0, 3.0, 0, 0]]])  # (1, 4, 4)
    v = torch.tensor([[[0.0, 3.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0], [2.0, 2.6, 2.2, 2.4]]])
    layer = QuantLayerKV.from_dense(k, v, torch.arange(4), QuantSpec(group=4, residual=None))
    layer.apply_plan(torch.full((1, 4), LOW, dtype=torch.int8), bits_high=FULL, bits_low=2)
    keys, values = layer.dense()
    # per channel over the 4 tokens: channel 0 exact (scale 1), channel 1 rounded (0.5 -> 0 half to even, 1.4 -> 1)
    assert keys[0, :, :2].tolist() == [[0.0, 0.0], [1.0, 0.0], [2.0, 1.0], [3.0, 3.0]]
    assert layer.k.packed[2].scale.tolist() == [[1.0, 1.0, 0.0, 0.0]] and layer.k.packed[2].zero.abs().sum() == 0
    torch.testing.assert_close(values, v)  # per token: scales 1, 0, 0, 0.2, every value on the grid
    assert layer.v.packed[2].scale[1:3].tolist() == [[0.0], [0.0]], "constant groups: scale 0, reconstructed exactly"
    codes = [[0, 0, 0, 0], [1, 0, 0, 0], [2, 1, 0, 0], [3, 3, 0, 0]]
    assert unpack(layer.k.packed[2].codes, 2).tolist() == codes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_round_trip_error_is_at_most_half_a_step(bits, dtype):
    layer, k, v = all_at(bits, h=2, n=96, d=64, dtype=dtype)
    keys, values = layer.dense()
    for side, x, xq in ((layer.k, k, keys), (layer.v, v, values)):
        p = side.packed[bits]
        step = p.scale[p.param].float().repeat_interleave(p.width, 1)[side.slot].view(x.shape)  # (H, n, d)
        err = (xq.float() - x.float()).abs()
        tol = 1e-6 + xq.float().abs() * torch.finfo(dtype).eps / 2  # the dequantised value's own rounding
        assert (err <= step / 2 + tol).all(), (bits, float((err - step / 2).max()))
        assert err.max() > step.max() / 20, "the values really were quantised"
    assert layer.k.packed[bits].scale.shape == (2 * 96 // 32, 64), "keys: one scale per (token group, channel)"
    assert layer.v.packed[bits].scale.shape == (2 * 96, 64 // 32), "values: one scale per (token, channel group)"


def test_error_shrinks_with_bits():
    errs = [float((all_at(b, 2, 64, 64)[0].dense()[0] - rand(2, 64, 64)).abs().mean()) for b in (2, 4, 8)]
    assert errs[0] > 3 * errs[1] > 9 * errs[2] > 0


# -- bytes -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bytes_per_bit_width(bits):
    h, n, d, g, e = 2, 256, 64, 32, 2  # fp16
    layer, _, _ = all_at(bits, h, n, d, group=g, dtype=torch.float16)
    codes = h * n * d * bits // 8  # per side
    key_params = 2 * (h * n // g) * d * e  # scale + zero per (token group, channel)
    value_params = 2 * (h * n) * (d // g) * e  # scale + zero per (token, channel group)
    assert layer.nbytes() == 2 * codes + key_params + value_params
    fp16 = 2 * h * n * d * e
    assert layer.full_nbytes() == fp16
    assert 2 * codes == fp16 * bits // 16  # "2-bit" = 1/8 of fp16 ...
    assert layer.nbytes() - fp16 * bits // 16 == fp16 // 16  # ... plus the scales: 2 x 2 bytes per 32 entries


def test_kivi_prefill_bytes_count_the_residual():
    h, n, d, e = 2, 200, 64, 4
    layer = QuantLayerKV.from_dense(rand(h, n, d), rand(h, n, d, seed=1), torch.arange(n),
                                    QuantSpec(k_bits=2, v_bits=4, group=32, residual=128))
    keys = h * 128 * d * 2 // 8 + 2 * (h * 128 // 32) * d * e + h * 72 * d * e  # 128 quantised, 72 full
    values = h * 72 * d * 4 // 8 + 2 * h * 72 * (d // 32) * e + h * 128 * d * e  # 72 quantised, 128 full
    assert layer.nbytes() == keys + values


# -- KIVI's residual -------------------------------------------------------------------------------------------------
def step(layer: QuantLayerKV, t: int, d: int, seed: int) -> None:
    """One decode step: append one token, attend (the step's flush follows the attention)."""
    layer.append(rand(layer.n_heads, 1, d, seed=seed), rand(layer.n_heads, 1, d, seed=seed + 1), torch.tensor([t]))
    layer.attend(rand(2 * layer.n_heads, 1, d, seed=seed + 2), d**-0.5)


def test_residual_flush_follows_kivi():
    h, n, d, r = 2, 200, 16, 32
    k, v = rand(h, n, d), rand(h, n, d, seed=1)
    layer = QuantLayerKV.from_dense(k, v, torch.arange(n), QuantSpec(k_bits=2, v_bits=2, group=16, residual=r))
    # prefill: keys floor(200 / 32) * 32 = 192 quantised, 8 full; values all but the newest 32
    assert layer.precision_counts() == {"k": {2: h * 192, FULL: h * 8}, "v": {2: h * 168, FULL: h * 32}}
    keys, values = layer.dense()
    assert torch.equal(keys[:, 192:], k[:, 192:]) and torch.equal(values[:, 168:], v[:, 168:]), "residual exact"
    assert not torch.equal(keys[:, :192], k[:, :192])
    for s in range(26):
        step(layer, n + s, d, seed=10 + 3 * s)
        key_full = (8 + s + 1) % r  # the key residual is quantised whole when it reaches 32 (after step 24)
        want = {2: h * (n + s + 1 - key_full), FULL: h * key_full} if key_full else {2: h * (n + s + 1)}
        assert layer.precision_counts()["k"] == want, s
        assert layer.precision_counts()["v"] == {2: h * (168 + s + 1), FULL: h * r}, "a sliding 32-value window"
    assert (layer.k.full.shape[0], layer.v.full.shape[0]) == (h * 2, h * r), "only the residual in full precision"
    assert layer.k.packed[2].scale.shape[0] == h * 224 // 16, "the flushed residual made 2 new key groups per head"


def test_short_prompt_stays_full_precision_until_the_residual_fills():
    layer = QuantLayerKV.from_dense(rand(2, 20, 16), rand(2, 20, 16), torch.arange(20), QuantSpec(residual=32))
    assert layer.precision_counts() == {"k": {FULL: 40}, "v": {FULL: 40}}
    for s in range(12):
        step(layer, 20 + s, 16, seed=3 * s)
    assert layer.precision_counts() == {"k": {4: 64}, "v": {FULL: 64}}, "32 keys quantised, values: the window"
    step(layer, 32, 16, seed=99)
    assert layer.precision_counts() == {"k": {4: 64, FULL: 2}, "v": {4: 2, FULL: 64}}


# -- plans -----------------------------------------------------------------------------------------------------------
def test_mixed_plan_counts_and_bytes():
    h, n, d, g, e = 2, 64, 32, 16, 4
    layer = QuantLayerKV.from_dense(rand(h, n, d), rand(h, n, d, seed=1), torch.arange(n),
                                    QuantSpec(group=g, residual=None))
    plan = torch.full((h, n), LOW, dtype=torch.int8)
    plan[0, :10], plan[0, 10:30] = EVICT, HIGH  # head 0: 10 evicted, 20 high, 34 low
    plan[1, ::2] = HIGH  # head 1: 32 high, 32 low, interleaved
    plan[1, -4:] = EVICT  # ... minus 2 high and 2 low
    layer.apply_plan(plan, bits_high=8, bits_low=2)
    assert layer.lens.tolist() == [54, 60]
    assert layer.precision_counts() == {"k": {8: 20 + 30, 2: 34 + 30}, "v": {8: 50, 2: 64}}
    assert layer.head(1)[2].tolist() == list(range(60)), "positions kept in token order"
    key_groups = {8: math.ceil(20 / g) + math.ceil(30 / g), 2: math.ceil(34 / g) + math.ceil(30 / g)}  # per head
    expected = sum(m * d * b // 8 * 2 + 2 * key_groups[b] * d * e + 2 * m * (d // g) * e
                   for b, m in ((8, 50), (2, 64)))
    assert layer.nbytes() == expected
    assert not layer.k.pending.any(), "planned entries leave the residual"


@pytest.mark.parametrize("rule", ["minority", "half", "majority"])  # how many tokens are HIGH
def test_each_class_is_quantised_as_if_alone(rule):
    """A plan's two classes are quantised from the same full-precision rows and stored with one compaction; each
    class holds exactly what quantising its rows alone gives (its own key groups, its own value groups), whichever
    class is larger."""
    h, n, d, g = 2, 80, 32, 16
    k, v = rand(h, n, d), rand(h, n, d, seed=1)
    token = torch.arange(n)
    high = {"minority": token % 5 == 0, "half": token % 2 == 0, "majority": token % 5 != 0}[rule].expand(h, n)
    layer = QuantLayerKV.from_dense(k, v, torch.arange(n), QuantSpec(group=g, residual=None))
    layer.apply_plan(torch.where(high, HIGH, LOW).to(torch.int8), bits_high=4, bits_low=2)
    for mask, bits in ((high[0], 4), (~high[0], 2)):
        alone = QuantLayerKV.from_dense(k[:, mask], v[:, mask], torch.arange(n)[mask],
                                        QuantSpec(group=g, residual=None))
        alone.apply_plan(torch.full((h, int(mask.sum())), LOW, dtype=torch.int8), bits_high=FULL, bits_low=bits)
        for head in range(h):
            got, want = layer.head(head), alone.head(head)
            assert torch.equal(got[0][mask], want[0]) and torch.equal(got[1][mask], want[1]), (bits, head)


def test_plan_keeps_high_in_full_precision_and_refuses_requantising():
    layer = QuantLayerKV.from_dense(rand(1, 8, 16), rand(1, 8, 16), torch.arange(8), QuantSpec(group=4,
                                                                                               residual=None))
    full_k = layer.dense()[0].clone()
    plan = torch.tensor([[HIGH, LOW, LOW, LOW, LOW, HIGH, HIGH, HIGH]], dtype=torch.int8)
    layer.apply_plan(plan, bits_high=FULL, bits_low=4)
    assert torch.equal(layer.dense()[0][0, [0, 5, 6, 7]], full_k[0, [0, 5, 6, 7]])
    before = layer.nbytes()
    with pytest.raises(ValueError, match="already quantised"):
        layer.apply_plan(torch.full((1, 8), LOW, dtype=torch.int8), bits_high=FULL, bits_low=2)
    assert layer.nbytes() == before and layer.lens.tolist() == [8], "a refused plan changes nothing"
    layer.apply_plan(plan, bits_high=FULL, bits_low=4)  # the same plan again: nothing to do
    assert layer.nbytes() == before
    with pytest.raises(ValueError, match="plan codes"):
        layer.apply_plan(torch.full((1, 8), 7, dtype=torch.int8), bits_high=FULL, bits_low=4)


def test_a_shallow_copy_is_a_fork():
    """Tensors are never changed in place (SweepEngine forks layers with ``dataclasses.replace``)."""
    layer = QuantLayerKV.from_dense(rand(2, 40, 16), rand(2, 40, 16), torch.arange(40), QuantSpec(group=8, residual=16))
    keys, values = layer.dense()
    fork = replace(layer)
    for s in range(20):
        step(fork, 40 + s, 16, seed=s)
    fork.apply_plan(torch.full((2, 60), HIGH, dtype=torch.int8), bits_high=4, bits_low=2)
    fork.select([torch.arange(5), torch.arange(9)])
    assert torch.equal(layer.dense()[0], keys) and torch.equal(layer.dense()[1], values)
    assert layer.lens.tolist() == [40, 40] and layer.precision_counts() == {"k": {4: 64, FULL: 16},
                                                                            "v": {4: 48, FULL: 32}}


def test_select_truncate_clone_and_exact_rollback():
    layer = QuantLayerKV.from_dense(rand(2, 40, 16), rand(2, 40, 16), torch.arange(40), QuantSpec(residual=32))
    copy = layer.clone()
    layer.append(rand(2, 3, 16), rand(2, 3, 16), torch.arange(40, 43))  # no attend yet: no flush
    layer.truncate(torch.tensor([40, 40]))
    assert torch.equal(layer.dense()[0], copy.dense()[0]) and layer.nbytes() == copy.nbytes()
    step(layer, 40, 16, seed=5)  # the value window flushes its oldest token after this step
    with pytest.raises(UsageError, match="rolled back past a flush"):
        layer.truncate(torch.tensor([40, 40]))
    copy.select([torch.tensor([0, 5, 39]), torch.arange(10, 40)])
    assert copy.lens.tolist() == [3, 30] and copy.head(0)[2].tolist() == [0, 5, 39]
    assert copy.precision_counts()["v"] == {4: 2, FULL: 1 + 30}, "values 0..7 were quantised, the rest full"


# -- method=kivi through the engine against a reference ---------------------------------------------------------------
class KiviReference:
    """KIVI's cache as jy-yuan/KIVI ``models/llama_kivi.py`` keeps it, written independently of kvbench's store:
    fake-quantised (quantise + dequantise) keys and values next to full-precision residuals, plain fp32 attention.
    Used as a transformers attention function; the model is called with ``use_cache=False`` on new tokens only."""

    def __init__(self, bits: int, group: int, residual: int) -> None:
        self.bits, self.group, self.r = bits, group, residual
        self.state: dict[int, list[Tensor]] = {}

    def fake_keys(self, x: Tensor) -> Tensor:  # (1, H, T, d), T a multiple of group: per channel over token groups
        g = x.view(1, x.shape[1], -1, self.group, x.shape[-1])
        mn, mx = g.amin(-2, keepdim=True), g.amax(-2, keepdim=True)
        scale = (mx - mn) / (2**self.bits - 1)
        return (((g - mn) / scale).round().clamp(0, 2**self.bits - 1) * scale + mn).view_as(x)

    def fake_values(self, x: Tensor) -> Tensor:  # per token over channel groups
        width = min(self.group, x.shape[-1])
        g = x.view(*x.shape[:-1], -1, width)
        mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = (mx - mn) / (2**self.bits - 1)
        return (((g - mn) / scale).round().clamp(0, 2**self.bits - 1) * scale + mn).view_as(x)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        i, n = module.layer_idx, key.shape[2]
        if i not in self.state:  # prefill: full-precision attention, then KIVI's prefill quantisation
            out = attention(query, key, value, scaling, causal=True)
            nk, nv = n - n % self.r, max(n - self.r, 0)
            self.state[i] = [self.fake_keys(key[:, :, :nk]), key[:, :, nk:],
                             self.fake_values(value[:, :, :nv]), value[:, :, nv:]]
            return out, None
        kq, kf, vq, vf = self.state[i]
        kf, vf = torch.cat([kf, key], 2), torch.cat([vf, value], 2)
        out = attention(query, torch.cat([kq, kf], 2), torch.cat([vq, vf], 2), scaling, causal=False)
        if kf.shape[2] == self.r:
            kq, kf = torch.cat([kq, self.fake_keys(kf)], 2), kf[:, :, :0]
        if vf.shape[2] > self.r:
            vq, vf = torch.cat([vq, self.fake_values(vf[:, :, :1])], 2), vf[:, :, 1:]
        self.state[i] = [kq, kf, vq, vf]
        return out, None


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> Tensor:
    """(1, Hq, q, d) x (1, Hkv, L, d) -> (1, q, Hq, d), fp32 softmax, GQA by repeating the KV heads."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    logits = q @ k.transpose(-1, -2) * scale
    if causal:
        logits = logits.masked_fill(torch.ones_like(logits, dtype=torch.bool).triu(1), float("-inf"))
    return (logits.softmax(-1) @ v).transpose(1, 2)


def reference_decode(model, ids: Tensor, tokens: list[int], ref: KiviReference) -> list[Tensor]:
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("kivi_reference", ref)
    AttentionMaskInterface.register("kivi_reference", lambda *a, **k: None)
    saved, model.config._attn_implementation = model.config._attn_implementation, "kivi_reference"
    try:
        pos, out = torch.arange(len(ids)), []
        with torch.no_grad():
            out.append(model(input_ids=ids[None], position_ids=pos[None], use_cache=False).logits[0, -1])
            for t, tok in enumerate(tokens):
                p = torch.tensor([[len(ids) + t]])
                out.append(model(input_ids=torch.tensor([[tok]]), position_ids=p, use_cache=False).logits[0, -1])
    finally:
        model.config._attn_implementation = saved
    return out


def engine_decode(model, method, ids: Tensor, steps: int) -> tuple[list[Tensor], list[int], KVStore]:
    with Engine(model, method, Uniform(), budget=1.0) as eng:
        eng.reset()
        logits = [eng.forward(ids, compress=True)]
        tokens = []
        for _ in range(steps):
            tokens.append(int(logits[-1].argmax()))
            logits.append(eng.forward([tokens[-1]]))
        return logits, tokens, eng.store


SMALL_RESIDUAL = ("method.residual_length=16", "method.group_size=8")  # a key flush after 8 steps
CASES = [("kivi", (), 4), ("kivi_2bit", (), 4), ("kivi_2bit", SMALL_RESIDUAL, 12)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize(("name", "overrides", "steps"), CASES)
def test_kivi_decode_logits_match_the_reference(tiny_model, prompt, arch, name, overrides, steps):
    model, ids = tiny_model(arch), prompt(200, seed=3)
    method = load_method(name, overrides)[0]
    logits, tokens, store = engine_decode(model, method, ids, steps)
    ref = reference_decode(model, ids, tokens, KiviReference(method.k_bits, method.group_size,
                                                             method.residual_length))
    for s, (a, b) in enumerate(zip(logits, ref, strict=True)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0, msg=f"step {s}")
    full, _, _ = engine_decode(model, FullKV(), ids, steps)
    assert torch.equal(full[0], logits[0]), "prefill attention is full precision"
    assert (full[1] - logits[1]).abs().max() > 1e-4, "quantisation changes the decode logits (the check can fail)"
    r = method.residual_length
    n_k_full = (200 % r + steps) % r  # key residual of the last step's state
    assert store.layers[0].precision_counts()["k"].get(FULL, 0) == N_KV_HEADS * n_k_full


def test_kivi_bytes_in_the_engine(tiny_model, prompt):
    """Llama tiny, n = 200, fp32, d = 16 (one value group per token), group 32, residual 128."""
    _, _, store = engine_decode(tiny_model("llama"), load_method("kivi_2bit")[0], prompt(200), 0)
    h, d, e = N_KV_HEADS, HEAD_DIM, 4
    keys = h * 128 * d * 2 // 8 + 2 * (h * 128 // 32) * d * e + h * 72 * d * e
    values = h * 72 * d * 2 // 8 + 2 * h * 72 * 1 * e + h * 128 * d * e
    assert store.nbytes() == N_LAYERS * (keys + values)
    assert store.nbytes() < 0.6 * N_LAYERS * 2 * h * 200 * d * e


# -- errors ----------------------------------------------------------------------------------------------------------
@dataclass
class Paged(FullKV):
    name: str = "paged"
    layer_store: ClassVar[str] = "paged"


def test_budget_and_compat_errors(tiny_model):
    model = tiny_model(ARCHS[0])
    with pytest.raises(UsageError, match=r"budget=1\.0 \(got budget=0\.2\)"):
        Engine(model, KIVI(), Uniform(), budget=0.2)
    with pytest.raises(UsageError, match=r"Paged.layer_store='paged'; use one of \('evict', 'quantized'\)"):
        Engine(model, Paged(), Uniform(), budget=1.0)
    with pytest.raises(UsageError, match="allocator=pyramid would be ignored"):
        Engine(model, KIVI(), Pyramid(), budget=1.0)
    for kwargs, msg in (({"k_bits": 3}, "k_bits=3"), ({"v_bits": 16}, "v_bits=16"),
                        ({"residual_length": 100}, "multiple of group"), ({"group_size": 0}, "group size")):
        with pytest.raises(UsageError, match=msg):
            KIVI(**kwargs)
    with pytest.raises(UsageError, match="head_dim 6 cannot be packed at 2 bits"):
        QuantLayerKV.from_dense(rand(1, 4, 6), rand(1, 4, 6), torch.arange(4), QuantSpec(2, 2, 2, 4))
    with pytest.raises(UsageError, match="head_dim 48 is not a multiple"):
        QuantLayerKV.from_dense(rand(1, 4, 48), rand(1, 4, 48), torch.arange(4), QuantSpec())


def test_query_agnostic_rollback_past_a_flush_is_exact(tiny_model, prompt):
    """Questions over one quantised context: a rollback (a copied snapshot) undoes the flushes a question caused,
    so a question asked after another one gets exactly the logits it gets first."""
    model, ctx = tiny_model("llama"), prompt(150)
    q1, q2 = prompt(40, seed=1), prompt(25, seed=2)
    method, alloc = KIVI(group_size=16, residual_length=16), Uniform()
    with Engine(model, method, alloc, budget=1.0) as eng:
        eng.reset()
        eng.forward(ctx)
        snap = eng.snapshot()
        first = eng.forward(q1)  # 40 tokens: the residual of 16 flushes
        eng.rollback(snap)
        eng.forward(q2)
        eng.rollback(snap)
        again = eng.forward(q1)
    torch.testing.assert_close(first, again, atol=0, rtol=0)

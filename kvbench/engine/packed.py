"""Packed low-bit rows of a quantised KV layer: bit packing, min-max quantisation groups, and one side (keys or
values) of a layer, every flat row in full precision or at a packed bit width. Used by ``kvbench.engine.quant``,
whose docstring describes the layout and the deviations from KIVI."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from kvbench.engine.store import cu_from_lens

FULL = 16  # bit width of a row kept in full precision (the model dtype)
BITS = (2, 4, 8)  # packed bit widths

# -- packing and min-max quantisation -------------------------------------------------------------------------------
def pack(codes: Tensor, bits: int) -> Tensor:
    """(m, d) integer codes in [0, 2^bits) -> (m, d * bits / 8) uint8, 8/bits codes per byte, low bits first.

    The 8/bits consecutive code bytes of an output byte are read as one little-endian integer word (int32 for 2
    bits, int16 for 4) and shifted together, two to three times faster on a CPU than one strided pass per code
    (little-endian hosts only: x86, ARM and CUDA devices are; a big-endian host is refused)."""
    if sys.byteorder != "little":
        raise RuntimeError("packing KV codes assumes a little-endian host (the word view reads byte 0 first)")
    per = 8 // bits
    c = codes.to(torch.uint8, copy=True).contiguous()  # a fresh buffer: aligned for the word view below
    if per == 1:
        return c
    words = c.view(torch.int32 if per == 4 else torch.int16)  # (m, d / per): code j of a byte in bits 8j..8j+7
    out = words | words >> (8 - bits)
    for j in range(2, per):  # move code j from bit 8j to bit bits * j (the codes do not overlap: OR = sum)
        out |= words >> (8 - bits) * j
    return (out & 0xFF).to(torch.uint8)


def unpack(packed: Tensor, bits: int) -> Tensor:
    """(m, d * bits / 8) uint8 -> (m, d) uint8 codes; the inverse of ``pack``."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits  # (per,)
    return ((packed[:, :, None] >> shifts) & (2**bits - 1)).reshape(packed.shape[0], -1)


def minmax_codes_(x: Tensor, mn: Tensor, scale: Tensor, bits: int) -> Tensor:
    """Codes of x (fp32), written into x, for zero points and scales broadcastable to it; a zero scale (constant
    group) gives code 0. In place: the values of ``((x - mn) / scale).round().clamp(0, 2^bits - 1)``, bit for bit."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return x.sub_(mn).div_(safe).round_().clamp_(0, 2**bits - 1)


def round_out(x: Tensor, dtype: torch.dtype, up: bool) -> Tensor:
    """x (fp32) stored in ``dtype``, rounded towards +inf (up) or -inf (down) instead of to nearest (fp32: x)."""
    if dtype == x.dtype:  # nothing to round (the general path below returns x too, with seven more passes)
        return x
    y = x.to(dtype)
    bad = y.float() < x if up else y.float() > x
    return torch.where(bad, torch.nextafter(y, torch.full_like(y, float("inf") if up else float("-inf"))), y)


def grid(mn: Tensor, mx: Tensor, bits: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Stored zero point and scale of groups with minimum mn and maximum mx (fp32): zero <= mn and
    zero + (2^bits - 1) * scale >= mx after rounding to ``dtype``, so every element is within half a step."""
    zero = round_out(mn, dtype, up=False)
    return zero, round_out((mx - zero.float()) / (2**bits - 1), dtype, up=True)


def quantize_tokens(xp: Tensor, bits: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Keys: per channel over token groups. xp (groups, group, d) fp32, each group's rows padded with copies of its
    first row (``padded_groups``), overwritten -> codes (groups, group, d) (xp itself), scale and zero (groups, d)
    in ``dtype`` (the codes are computed from the stored, rounded scale and zero). The padding copies change no
    minimum or maximum."""
    zero, scale = grid(xp.amin(1), xp.amax(1), bits, dtype)
    return minmax_codes_(xp, zero.float()[:, None], scale.float()[:, None], bits), scale, zero


def quantize_channels(x: Tensor, group: int, bits: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Values: per token over channel groups. x (m, d) fp32, overwritten -> codes (m, d) (x itself), scale and zero
    (m, d / group)."""
    m, d = x.shape
    xg = x.view(m, d // group, group)
    mn, mx = xg.amin(-1), xg.amax(-1)  # (m, d/group)
    zero, scale = grid(mn, mx, bits, dtype)
    codes = minmax_codes_(xg, zero.float()[..., None], scale.float()[..., None], bits)
    return codes.view(m, d), scale, zero


def padded_groups(heads: Tensor, n_heads: int, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows (m,) of a class, head-major in token order, in groups of ``group`` consecutive rows of a head (the last
    one of each head possibly shorter) -> ``gid`` (m,) the group of each row, ``slot`` (m,) its row in the padded
    layout (groups, group) and ``src`` (groups * group,) the row each padded slot holds: itself, or its group's
    first row in the slots past a short group's end."""
    counts = torch.bincount(heads, minlength=n_heads)  # (H,)
    rank = torch.arange(len(heads), device=heads.device) - cu_from_lens(counts)[heads]
    offsets = cu_from_lens((counts + group - 1) // group)  # (H+1,) first group of each head
    gid = offsets[heads] + rank // group
    slot = gid * group + rank % group
    src = torch.full((int(offsets[-1]) * group,), -1, dtype=torch.long, device=heads.device)
    src[slot] = torch.arange(len(heads), device=heads.device)
    src = src.view(-1, group)
    return gid, slot, torch.where(src < 0, src[:, :1], src).view(-1)  # every group's first slot is a real row


# -- one side (keys or values) --------------------------------------------------------------------------------------
@dataclass
class Packed:
    """Rows stored at one bit width: codes (m, d*b/8) uint8; scale/zero (p, c); param (m,) the scale row of each
    code row; ``width`` channels share one scale column (keys 1, values the channel group)."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    param: Tensor
    width: int

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def dequantize(self, bits: int, slots: Tensor) -> Tensor:
        """Code rows ``slots`` -> (len(slots), d) fp32: code * scale + zero, the scales broadcast over ``width``."""
        param = self.param[slots]
        codes = unpack(self.codes.index_select(0, slots), bits)  # (m, d) codes of the rows
        codes = codes.view(len(slots), self.scale.shape[1], self.width)  # (m, c, width)
        scale = self.scale.index_select(0, param).float()[:, :, None]  # (m, c, 1)
        zero = self.zero.index_select(0, param).float()[:, :, None]
        return torch.addcmul(zero, codes.float(), scale).view(len(slots), -1)

    def clone(self) -> Packed:
        return Packed(self.codes.clone(), self.scale.clone(), self.zero.clone(), self.param.clone(), self.width)

    def take(self, slots: Tensor) -> Packed:
        """Only the code rows ``slots`` (in that order), and only the scale rows they use."""
        used, inverse = torch.unique(self.param[slots], return_inverse=True)
        return Packed(self.codes.index_select(0, slots), self.scale.index_select(0, used),
                      self.zero.index_select(0, used), inverse, self.width)

    def extend(self, other: Packed) -> Packed:
        param = torch.cat([self.param, other.param + self.scale.shape[0]])
        return Packed(torch.cat([self.codes, other.codes]), torch.cat([self.scale, other.scale]),
                      torch.cat([self.zero, other.zero]), param, self.width)


@dataclass
class Side:
    """Keys or values of a layer. Per flat row (T,): ``bits`` (int8, 16 = full precision), ``slot`` (its row in
    ``full`` or in ``packed[bits]``), ``pending`` (in the residual window, awaiting a flush) and ``stamp`` (the
    head's length when the row got its representation; a rollback before that point cannot be undone)."""

    bits: Tensor
    slot: Tensor
    pending: Tensor
    stamp: Tensor
    full: Tensor
    packed: dict[int, Packed] = field(default_factory=dict)

    @classmethod
    def dense(cls, x: Tensor) -> Side:
        """(T, d) full-precision rows, all in the residual."""
        t = x.shape[0]
        return cls(torch.full((t,), FULL, dtype=torch.int8, device=x.device), torch.arange(t, device=x.device),
                   torch.ones(t, dtype=torch.bool, device=x.device), torch.zeros(t, dtype=torch.int32, device=x.device),
                   x)

    def nbytes(self) -> int:
        return self.full.numel() * self.full.element_size() + sum(p.nbytes() for p in self.packed.values())

    def clone(self) -> Side:
        return Side(self.bits.clone(), self.slot.clone(), self.pending.clone(), self.stamp.clone(), self.full.clone(),
                    {b: p.clone() for b, p in self.packed.items()})

    def rows(self, start: int = 0, end: int | None = None) -> Tensor:
        """Flat rows [start, end) dequantised, (end - start, d) in the model dtype."""
        bits, slot = self.bits[start:end], self.slot[start:end]
        out = self.full.new_empty(len(bits), self.full.shape[1])
        for b in (FULL, *self.packed):
            idx = (bits == b).nonzero().squeeze(1)
            if len(idx):
                if b == FULL:
                    rows = self.full.index_select(0, slot[idx])
                else:
                    rows = self.packed[b].dequantize(b, slot[idx]).to(out.dtype)
                out.index_copy_(0, idx, rows)
        return out

    def take(self, rows: Tensor) -> Side:
        """The rows ``rows`` in that order; storage not referenced any more is dropped."""
        bits, slot = self.bits[rows], self.slot[rows].clone()
        full = self.full.index_select(0, slot[bits == FULL])
        packed = {}
        for b in [FULL, *self.packed]:
            mask = bits == b
            if b != FULL and bool(mask.any()):
                packed[b] = self.packed[b].take(slot[mask])
            slot[mask] = torch.arange(int(mask.sum()), device=slot.device)
        return Side(bits, slot, self.pending[rows], self.stamp[rows], full, packed)

    def permute(self, order: Tensor) -> Side:
        """Reorder rows without touching storage (every row kept)."""
        return replace(self, bits=self.bits[order], slot=self.slot[order], pending=self.pending[order],
                       stamp=self.stamp[order])

    def append_full(self, x: Tensor) -> Side:
        """m new full-precision rows (pending) at the end."""
        m, dev = x.shape[0], x.device
        slot = torch.arange(self.full.shape[0], self.full.shape[0] + m, device=dev)
        pending = torch.cat([self.pending, self.pending.new_ones(m)])
        return Side(torch.cat([self.bits, self.bits.new_full((m,), FULL)]), torch.cat([self.slot, slot]), pending,
                    torch.cat([self.stamp, self.stamp.new_zeros(m)]), torch.cat([self.full, x]), dict(self.packed))

    def store(self, parts: list[Part]) -> Side:
        """Give the full-precision rows of each part (disjoint) their new representation, no longer pending;
        the full-precision storage is compacted once."""
        new_bits, slot = self.bits.clone(), self.slot.clone()
        pending, stamps = self.pending.clone(), self.stamp.clone()
        packed = dict(self.packed)
        for part in parts:
            pending[part.rows], stamps[part.rows] = False, part.stamp
            if part.block is not None:
                old = packed.get(part.bits)
                new_bits[part.rows] = part.bits
                first = 0 if old is None else old.codes.shape[0]
                slot[part.rows] = torch.arange(first, first + len(part.rows), device=slot.device)
                packed[part.bits] = part.block if old is None else old.extend(part.block)
        is_full = new_bits == FULL
        full = self.full.index_select(0, slot[is_full])
        slot[is_full] = torch.arange(int(is_full.sum()), device=slot.device)
        return Side(new_bits, slot, pending, stamps, full, packed)


@dataclass(frozen=True)
class Part:
    """New representation of some full-precision rows of a side: ``rows`` (m,) flat row indices, ``bits`` (16:
    they stay in full precision), ``block`` their codes in row order (None at 16 bits) and ``stamp`` (m,)."""

    rows: Tensor
    bits: int
    block: Packed | None
    stamp: Tensor


def quantize_block(source: Tensor, rows: Tensor, heads: Tensor, n_heads: int, bits: int, group: int,
                   per_channel: bool, dtype: torch.dtype) -> Packed:
    """The rows ``source[rows]`` (m, d), head-major in token order, with their heads (m,) -> a ``Packed`` block
    (keys: per channel over token groups of each head; values: per token over channel groups).

    Keys are gathered straight into the padded group layout, quantised there with broadcast scales and packed,
    and only the packed rows are gathered back (no per-row scale gathers)."""
    d = source.shape[1]
    if per_channel:
        gid, slot, src = padded_groups(heads, n_heads, group)
        xp = source.index_select(0, rows.index_select(0, src)).float().view(-1, group, d)  # (groups, group, d)
        codes, scale, zero = quantize_tokens(xp, bits, dtype)
        return Packed(pack(codes.view(-1, d), bits).index_select(0, slot), scale, zero, gid, 1)
    width = min(group, d)
    codes, scale, zero = quantize_channels(source.index_select(0, rows).float(), width, bits, dtype)
    return Packed(pack(codes, bits), scale, zero, torch.arange(len(rows), device=source.device), width)

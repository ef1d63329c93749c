"""Packed low-bit rows of a quantised KV layer: bit packing, min-max quantisation groups, and one side (keys or
values) of a layer, every flat row in full precision or at a packed bit width. Used by ``kvbench.engine.quant``,
whose docstring describes the layout and the deviations from KIVI."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from kvbench.engine.store import cu_from_lens

FULL = 16  # bit width of a row kept in full precision (the model dtype)
BITS = (2, 4, 8)  # packed bit widths

# -- packing and min-max quantisation -------------------------------------------------------------------------------
def pack(codes: Tensor, bits: int) -> Tensor:
    """(m, d) integer codes in [0, 2^bits) -> (m, d * bits / 8) uint8, 8/bits codes per byte, low bits first."""
    per = 8 // bits
    m, d = codes.shape
    c = codes.to(torch.uint8).view(m, d // per, per)
    out = torch.zeros(m, d // per, dtype=torch.uint8, device=codes.device)
    for j in range(per):
        out |= c[:, :, j] << (bits * j)
    return out


def unpack(packed: Tensor, bits: int) -> Tensor:
    """(m, d * bits / 8) uint8 -> (m, d) uint8 codes; the inverse of ``pack``."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits  # (per,)
    return ((packed[:, :, None] >> shifts) & (2**bits - 1)).reshape(packed.shape[0], -1)


def minmax_codes(x: Tensor, mn: Tensor, scale: Tensor, bits: int, rows: Tensor | None = None) -> Tensor:
    """Codes of x (fp32) for zero points and scales broadcastable to it, or, with ``rows``, for the rows
    ``mn[rows]`` / ``scale[rows]`` (gathered after the zero-scale guard, on the small tensors); a zero scale (constant
    group) gives code 0. One fresh tensor, then in place: the values of the out-of-place expression, bit for bit."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    if rows is not None:
        mn, safe = mn.index_select(0, rows), safe.index_select(0, rows)
    return (x - mn).div_(safe).round_().clamp_(0, 2**bits - 1)


def round_out(x: Tensor, dtype: torch.dtype, up: bool) -> Tensor:
    """x (fp32) stored in ``dtype``, rounded towards +inf (up) or -inf (down) instead of to nearest."""
    y = x.to(dtype)
    bad = y.float() < x if up else y.float() > x
    return torch.where(bad, torch.nextafter(y, torch.full_like(y, float("inf") if up else float("-inf"))), y)


def grid(mn: Tensor, mx: Tensor, bits: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Stored zero point and scale of groups with minimum mn and maximum mx (fp32): zero <= mn and
    zero + (2^bits - 1) * scale >= mx after rounding to ``dtype``, so every element is within half a step."""
    zero = round_out(mn, dtype, up=False)
    return zero, round_out((mx - zero.float()) / (2**bits - 1), dtype, up=True)


def quantize_tokens(x: Tensor, gid: Tensor, n_groups: int, bits: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Keys: per channel over token groups. x (m, d) fp32, gid (m,) group of each row -> codes (m, d), scale and
    zero (n_groups, d) in ``dtype`` (the codes are computed from the stored, rounded scale and zero)."""
    idx = gid[:, None].expand_as(x)
    mn = x.new_full((n_groups, x.shape[1]), float("inf")).scatter_reduce(0, idx, x, "amin")
    mx = x.new_full((n_groups, x.shape[1]), float("-inf")).scatter_reduce(0, idx, x, "amax")
    zero, scale = grid(mn, mx, bits, dtype)
    return minmax_codes(x, zero.float(), scale.float(), bits, gid), scale, zero


def quantize_channels(x: Tensor, group: int, bits: int, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Values: per token over channel groups. x (m, d) fp32 -> codes (m, d), scale and zero (m, d / group)."""
    m, d = x.shape
    xg = x.view(m, d // group, group)
    mn, mx = xg.amin(-1), xg.amax(-1)  # (m, d/group)
    zero, scale = grid(mn, mx, bits, dtype)
    codes = minmax_codes(xg, zero.float()[..., None], scale.float()[..., None], bits)
    return codes.view(m, d), scale, zero


def token_groups(heads: Tensor, n_heads: int, group: int) -> tuple[Tensor, int]:
    """Rows (m,) of a class, head-major in token order -> group id of each row (``group`` consecutive rows of a
    head, the last one of each head possibly shorter) and the number of groups."""
    counts = torch.bincount(heads, minlength=n_heads)  # (H,)
    rank = torch.arange(len(heads), device=heads.device) - cu_from_lens(counts)[heads]
    offsets = cu_from_lens((counts + group - 1) // group)  # (H+1,) first group of each head
    return offsets[heads] + rank // group, int(offsets[-1])


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

    def store(self, rows: Tensor, bits: int, block: Packed | None, stamp: Tensor) -> Side:
        """Give full-precision ``rows`` the representation ``bits`` (``block`` holds their codes, row order), no
        longer pending; the full-precision storage is compacted."""
        new_bits, slot = self.bits.clone(), self.slot.clone()
        pending, stamps = self.pending.clone(), self.stamp.clone()
        pending[rows], stamps[rows] = False, stamp
        packed = dict(self.packed)
        if block is not None:
            old = packed.get(bits)
            new_bits[rows] = bits
            slot[rows] = torch.arange(len(rows), device=rows.device) + (0 if old is None else old.codes.shape[0])
            packed[bits] = block if old is None else old.extend(block)
        is_full = new_bits == FULL
        full = self.full.index_select(0, slot[is_full])
        slot[is_full] = torch.arange(int(is_full.sum()), device=slot.device)
        return Side(new_bits, slot, pending, stamps, full, packed)


def quantize_block(x: Tensor, heads: Tensor, n_heads: int, bits: int, group: int, per_channel: bool,
                   dtype: torch.dtype) -> Packed:
    """Rows x (m, d), head-major in token order -> a ``Packed`` block (keys: per channel over token groups of each
    head; values: per token over channel groups)."""
    x = x.float()
    if per_channel:
        gid, n_groups = token_groups(heads, n_heads, group)
        codes, scale, zero = quantize_tokens(x, gid, n_groups, bits, dtype)
        return Packed(pack(codes, bits), scale, zero, gid, 1)
    width = min(group, x.shape[1])
    codes, scale, zero = quantize_channels(x, width, bits, dtype)
    return Packed(pack(codes, bits), scale, zero, torch.arange(x.shape[0], device=x.device), width)

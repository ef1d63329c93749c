"""Quantised KV storage (KIVI / ZipCache style): packed low-bit keys and values with a full-precision residual.

Layout, per layer (batch 1, ragged, head-major like ``LayerKV``): every (head, token) entry is a flat row whose key
and value each have a bit width, 16 (kept in full precision) or 2 / 4 / 8 (packed). Keys and values are separate
"sides" because KIVI quantises them at different times (below). Each side holds

* ``full``: the full-precision rows (model dtype), e.g. the residual window;
* per bit width b, a ``Packed`` block (``kvbench.engine.packed``, with the packing and min-max helpers): codes
  ``(m, d*b/8)`` uint8 (8/b codes per byte, channel j of a row at bit offset ``b * (j % (8/b))`` of byte
  ``j // (8/b)``), and min-max scale / zero point rows in the model dtype.

Quantisation is asymmetric min-max as in KIVI (jy-yuan/KIVI ``quant/new_pack.py``): ``scale = (max - min) / (2^b
- 1)``, ``zero = min``, ``code = clamp(round((x - zero) / scale))``, dequantised ``code * scale + zero``, so the error
of every element is at most ``scale / 2`` of its group. Keys are quantised **per channel**, over groups of
``group`` consecutive tokens of a head (one scale and zero per (group, channel)); values **per token**, over groups
of ``group`` consecutive channels (one scale and zero per (token, channel group)).

KIVI's residual (``models/llama_kivi.py``), with residual length R (a multiple of ``group``):
* keys: after prefill the first ``floor(n / R) * R`` tokens are quantised and ``n mod R`` stay in full precision;
  while decoding, the new key joins the residual and once it holds R tokens all R are quantised (R / group groups);
* values: after prefill all but the last R tokens are quantised (``n <= R``: none); while decoding the residual is
  a sliding window of the newest R values: the oldest one is quantised when the residual exceeds R;
* prefill attention uses the full-precision K/V, and a step's attention sees its residual before the step's flush.
``flush()`` applies both rules; ``from_dense`` (the prefill) and ``attend`` (after computing its output) call it.

Per-token plans (``apply_plan``): a method may decide per (head, token) between ``EVICT``, ``LOW`` and ``HIGH``
precision (ZipVL, ZipCache). Evicted rows are dropped; the rows of each precision are quantised with groups formed
among the rows of that precision, in token order, per head (the last group of a head may be shorter).

Deviations, all tested: codes are packed along channels per token into uint8 (KIVI packs keys along tokens into
int32 words for its CUDA kernel): the bytes are the same and eviction stays a row gather. A constant group (max =
min) is stored with scale 0 and reconstructed exactly (KIVI divides by zero). Zero points are stored rounded down
and scales rounded up in the model dtype (KIVI: to nearest), so that the half-step bound also holds in fp16/bf16
(exact in fp32). A head narrower than ``group`` is one value group. Bookkeeping (positions, bit widths, group
indices) is not counted in ``nbytes``, as for ``LayerKV``.

Attention dequantises the layer and attends over it with the engine's kernels (``cached_attention``): the
reference on CPU. A GPU kernel would fuse the unpacking into the matmuls (KIVI's ``cuda_bmm_fA_qB_outer``: q·Kᵀ
reads packed key codes with per-channel scales, P·V packed values with per-token scales), so that dequantised K/V
never reach memory; decode would then read ~b/16 of the fp16 bytes. The engine's ``peak_kv_bytes`` is measured
after each step's flush; the transient dequantised view (which a fused kernel never materialises) is not counted.
Known cost: besides the dequantisation, a decode step copies the per-row bookkeeping and, when values flush, the
value codes (``torch.cat``), O(cache) per token like ``LayerKV.append`` today; in-place growth would remove it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from kvbench.engine.attention import cached_attention
from kvbench.engine.packed import BITS, FULL, Part, Side, quantize_block
from kvbench.engine.store import LayerKV, cu_from_lens, ragged_index
from kvbench.errors import UsageError

if TYPE_CHECKING:
    from kvbench.budget import Allocator
    from kvbench.method import Method

# A plan: one int8 code per (head, token), (H, n) for a uniform layer or (T,) flat head-major for any layer.
EVICT, LOW, HIGH = 0, 1, 2
PLAN_CODES = (EVICT, LOW, HIGH)


@dataclass(frozen=True)
class QuantSpec:
    """How a quantised layer stores new tokens: bit widths, group size and KIVI's residual length.

    ``residual=None``: tokens stay in full precision until a plan quantises them (nothing is flushed).
    """

    k_bits: int = 4
    v_bits: int = 4
    group: int = 32
    residual: int | None = 128

    def __post_init__(self) -> None:
        for name in ("k_bits", "v_bits"):
            check_bits(getattr(self, name), name)
        if self.group < 1:
            raise UsageError(f"group={self.group}: the quantisation group size must be >= 1")
        if self.residual is not None and (self.residual < 1 or self.residual % self.group):
            raise UsageError(f"residual={self.residual} must be a positive multiple of group={self.group} "
                             "(keys are flushed as residual/group whole groups, as in KIVI)")


def check_bits(bits: int, name: str = "bits", allow_full: bool = False) -> int:
    ok = (*BITS, FULL) if allow_full else BITS
    if bits not in ok:
        raise UsageError(f"{name}={bits}: choose one of {', '.join(map(str, ok))}")
    return bits



# -- the layer ------------------------------------------------------------------------------------------------------
@dataclass
class QuantLayerKV:
    """One layer's quantised cache: the ``LayerKV`` surface plus ``attend``, ``flush``, ``apply_plan``.

    ``lens`` (H,) and ``positions`` (T,) as in ``LayerKV``; ``k`` and ``v`` the two sides; ``spec`` the bit widths,
    group size and residual used for flushed tokens. Tensors are never changed in place, so a shallow copy
    (``dataclasses.replace``) is a fork, as for ``LayerKV``.
    """

    k: Side
    v: Side
    lens: Tensor
    positions: Tensor
    spec: QuantSpec

    @classmethod
    def from_dense(cls, keys: Tensor, values: Tensor, positions: Tensor, spec: QuantSpec | None = None
                   ) -> QuantLayerKV:
        """keys/values (H, n, d), positions (n,) after prefill attention -> a layer quantised by KIVI's prefill
        rule (``flush``)."""
        spec = spec or QuantSpec()
        h, n, d = keys.shape
        check_head_dim(d, spec)
        layer = cls(Side.dense(keys.reshape(h * n, d)), Side.dense(values.reshape(h * n, values.shape[-1])),
                    torch.full((h,), n, dtype=torch.long, device=keys.device), positions.to(torch.int32).repeat(h),
                    spec)
        layer.flush()
        return layer

    @property
    def n_heads(self) -> int:
        return len(self.lens)

    @property
    def uniform(self) -> bool:
        return bool((self.lens == self.lens[0]).all())

    @property
    def dtype(self) -> torch.dtype:
        return self.k.full.dtype

    def nbytes(self) -> int:
        """Packed codes + scales + zero points + full-precision rows, keys and values."""
        return self.k.nbytes() + self.v.nbytes()

    def allocated_bytes(self) -> int:
        """Bytes reserved: the same as ``nbytes`` (the packed tensors are rebuilt to size, without growth slack)."""
        return self.nbytes()

    def full_nbytes(self) -> int:
        """Bytes the same entries would take in full precision (the model dtype)."""
        return len(self.positions) * (self.k.full.shape[1] + self.v.full.shape[1]) * self.k.full.element_size()

    def precision_counts(self) -> dict[str, dict[int, int]]:
        """Number of (head, token) entries per bit width, for keys and values: {"k": {16: 72, 4: 128}, ...}."""
        return {name: {int(b): int(c) for b, c in zip(*torch.unique(s.bits, return_counts=True), strict=True)}
                for name, s in (("k", self.k), ("v", self.v))}

    def dequantized(self) -> LayerKV:
        """The layer with dequantised keys and values (model dtype): what attention reads."""
        return LayerKV(self.k.rows(), self.v.rows(), self.lens, self.positions)

    def dense(self) -> tuple[Tensor, Tensor]:
        """(H, L, d) dequantised keys and values (copies); only valid when all heads have the same length."""
        return self.dequantized().dense()

    def head(self, h: int) -> tuple[Tensor, Tensor, Tensor]:
        """Dequantised keys (len_h, d), values (len_h, d) and positions (len_h,) of one head."""
        cu = cu_from_lens(self.lens)
        s, e = int(cu[h]), int(cu[h + 1])
        return self.k.rows(s, e), self.v.rows(s, e), self.positions[s:e]

    def attend(self, q: Tensor, scale: float, backend: str = "sdpa") -> Tensor:
        """Attention of q (Hq, q, d) new tokens, already appended, over the dequantised cache -> (q, Hq, d), as
        ``cached_attention`` for a ``LayerKV``; then the step's flush (KIVI quantises after the attention)."""
        out = cached_attention(q, self.dequantized(), scale, backend)
        self.flush()
        return out

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Append q new full-precision tokens to every head's residual. keys/values (H, q, d), positions (q,)."""
        h, q, _ = keys.shape
        t = len(self.positions)
        new_cu = cu_from_lens(self.lens + q)
        heads, pos = ragged_index(self.lens)
        order = torch.empty(t + h * q, dtype=torch.long, device=keys.device)
        order[new_cu[heads] + pos] = torch.arange(t, device=keys.device)
        new_rows = (new_cu[:-1, None] + self.lens[:, None] + torch.arange(q, device=keys.device)).reshape(-1)
        order[new_rows] = torch.arange(t, t + h * q, device=keys.device)
        self.k = self.k.append_full(keys.reshape(h * q, -1)).permute(order)
        self.v = self.v.append_full(values.reshape(h * q, -1)).permute(order)
        self.positions = torch.cat([self.positions, positions.to(self.positions.dtype).repeat(h)])[order]
        self.lens = self.lens + q

    def _take(self, rows: Tensor, lens: Tensor) -> None:
        self.k, self.v = self.k.take(rows), self.v.take(rows)
        self.positions, self.lens = self.positions[rows], lens

    def select(self, keep: list[Tensor]) -> None:
        """Keep, for each head h, the within-head token indices ``keep[h]`` (any order)."""
        cu = cu_from_lens(self.lens)
        rows = torch.cat([cu[h] + idx.sort().values for h, idx in enumerate(keep)])  # (T',)
        self._take(rows, torch.tensor([len(i) for i in keep], dtype=torch.long, device=self.lens.device))

    def truncate(self, lens: Tensor) -> None:
        """Drop the newest tokens of each head so that head h keeps its first ``lens[h]`` entries.

        Refused when a kept entry was quantised after its head reached ``lens[h]`` (a flush that involved the
        dropped tokens or happened later): that state cannot be restored without a copy of the layer."""
        heads, pos = ragged_index(self.lens)
        kept = pos < lens[heads]
        for side in (self.k, self.v):
            if bool((kept & (side.stamp > lens[heads])).any()):
                raise UsageError(
                    "a quantised KV cache cannot be rolled back past a flush of its residual (tokens quantised "
                    "since then would stay quantised, some in groups with the dropped tokens); roll back to a "
                    "copied snapshot (Engine.snapshot copies quantised layers)"
                )
        self._take(kept.nonzero().squeeze(1), lens.clone())

    def clone(self) -> QuantLayerKV:
        return QuantLayerKV(self.k.clone(), self.v.clone(), self.lens.clone(), self.positions.clone(), self.spec)

    # -- quantisation ---------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """KIVI's residual rule: keys quantise ``floor(r / R) * R`` of their r pending tokens, values all but the
        newest R; the oldest pending tokens go first. Nothing happens with ``residual=None``."""
        r = self.spec.residual
        if r is None:
            return
        self.k = self._flush(self.k, lambda n: n // r * r, self.spec.k_bits, per_channel=True)
        self.v = self._flush(self.v, lambda n: (n - r).clamp(min=0), self.spec.v_bits, per_channel=False)

    def _flush(self, side: Side, how_many: Callable[[Tensor], Tensor], bits: int, per_channel: bool) -> Side:
        heads, pos = ragged_index(self.lens)
        n_pending = torch.bincount(heads[side.pending], minlength=self.n_heads)  # (H,) trailing rows of each head
        first = self.lens - n_pending  # (H,) within-head index of the oldest pending row
        rows = ((pos >= first[heads]) & (pos < (first + how_many(n_pending))[heads])).nonzero().squeeze(1)
        if len(rows) == 0:
            return side
        return self._quantize(side, rows, bits, per_channel)

    def _quantize(self, side: Side, rows: Tensor, bits: int, per_channel: bool) -> Side:
        """Quantise full-precision ``rows`` (head-major, token order) at ``bits`` (16: keep as they are)."""
        return side.store([self._part(side, rows, bits, per_channel, ragged_index(self.lens)[0])])

    def _part(self, side: Side, rows: Tensor, bits: int, per_channel: bool, row_heads: Tensor) -> Part:
        """The new representation of full-precision ``rows`` at ``bits``, for ``Side.store``; row_heads (T,) is
        the head of every row of the layer."""
        heads = row_heads[rows]
        stamp = self.lens[heads].to(torch.int32)
        if bits == FULL:
            return Part(rows, FULL, None, stamp)
        if bool((side.bits[rows] != FULL).any()):
            raise ValueError("only full-precision entries can be quantised (re-quantising would compound errors)")
        block = quantize_block(side.full, side.slot[rows], heads, self.n_heads, bits, self.spec.group, per_channel,
                               self.dtype)
        return Part(rows, bits, block, stamp)

    def apply_plan(self, plan: Tensor, bits_high: int, bits_low: int) -> None:
        """Apply a per-(head, token) plan: ``EVICT`` rows are dropped, ``HIGH`` / ``LOW`` rows are stored at
        ``bits_high`` / ``bits_low`` (16 = full precision) for keys and values alike; none stays pending.

        plan: (H, n) int codes for a uniform layer, or (T,) flat head-major. Entries already quantised must be
        planned at the bit width they have (re-quantising would compound errors)."""
        flat = self._check_plan(plan)
        target = torch.full_like(flat, FULL, dtype=torch.int8)
        target[flat == HIGH] = check_bits(bits_high, "bits_high", allow_full=True)
        target[flat == LOW] = check_bits(bits_low, "bits_low", allow_full=True)
        check_packing(self.k.full.shape[1], bits_high, bits_low)
        for side in (self.k, self.v):  # validate before changing anything
            if bool(((flat != EVICT) & (side.bits != FULL) & (side.bits != target)).any()):
                raise ValueError("the plan asks for other bit widths for entries already quantised (re-quantising "
                                 "would compound errors): plan them at the bits they have")
        keep = (flat != EVICT).nonzero().squeeze(1)
        row_heads = ragged_index(self.lens)[0]
        if len(keep) < len(flat):  # (with nothing evicted the layer stays as it is)
            self._take(keep, torch.bincount(row_heads[keep], minlength=self.n_heads))
            flat, row_heads = flat[keep], row_heads[keep]
        for name, per_channel in (("k", True), ("v", False)):  # each class quantised from its own full rows,
            side = getattr(self, name)  # then one compaction of the side
            parts = [self._part(side, todo, bits, per_channel, row_heads)
                     for code, bits in ((HIGH, bits_high), (LOW, bits_low))
                     if len(todo := ((flat == code) & (side.bits == FULL)).nonzero().squeeze(1))]
            setattr(self, name, side.store(parts) if parts else side)

    def pending_tokens(self) -> int:
        """Tokens per head not yet planned or flushed (the newest ones; every head appends the same tokens)."""
        return int(self.k.pending.sum()) // max(self.n_heads, 1)

    def apply_tail_plan(self, tail: Tensor, bits_high: int, bits_low: int) -> None:
        """``apply_plan`` for the last m entries of every head, tail (H, m) codes; every earlier entry keeps the
        representation it has (planned ``HIGH`` when it is at ``bits_high`` or still in full precision, ``LOW``
        when at ``bits_low``): the re-plan of the newest tokens while generating (ZipVL)."""
        h, m = tail.shape
        bits = self.k.bits
        plan = torch.where(bits == bits_low, LOW, HIGH).to(torch.int8)
        plan[bits == bits_high] = HIGH
        ends = cu_from_lens(self.lens)[1:]  # (H,) one past each head's last row
        rows = (ends[:, None] - m + torch.arange(m, device=ends.device)[None, :]).reshape(-1)  # (H * m,)
        plan[rows] = tail.reshape(-1).to(torch.int8).to(plan.device)
        self.apply_plan(plan, bits_high, bits_low)

    def _check_plan(self, plan: Tensor) -> Tensor:
        flat = plan.reshape(-1) if plan.dim() == 2 else plan
        if plan.dim() == 2 and (not self.uniform or tuple(plan.shape) != (self.n_heads, int(self.lens[0]))):
            raise ValueError(f"a (H, n) plan needs a uniform layer of that shape; got {tuple(plan.shape)} for "
                             f"lengths {self.lens.tolist()} (pass a flat (T,) plan for ragged layers)")
        if flat.shape != self.positions.shape:
            raise ValueError(f"plan has {flat.numel()} entries, the layer {len(self.positions)}")
        if not bool(torch.isin(flat, torch.tensor(PLAN_CODES, device=flat.device)).all()):
            raise ValueError(f"plan codes must be EVICT={EVICT}, LOW={LOW} or HIGH={HIGH}")
        return flat


def check_head_dim(d: int, spec: QuantSpec) -> None:
    """Every bit width packs whole bytes of a row, and value groups tile the head."""
    check_packing(d, spec.k_bits, spec.v_bits)
    if d > spec.group and d % spec.group:
        raise UsageError(f"head_dim {d} is not a multiple of the value group size {spec.group}")


def check_packing(d: int, *bits: int) -> None:
    for b in bits:
        if b != FULL and d % (8 // b):
            raise UsageError(f"head_dim {d} cannot be packed at {b} bits ({8 // b} codes per byte)")


# -- what the engine needs: the layer kind a method declares --------------------------------------------------------
@dataclass(frozen=True)
class LayerKind:
    """How the engine builds a layer after prefill attention and attends over it, for a declared ``layer_store``."""

    name: str
    build: Callable[[Tensor, Tensor, Tensor], Any]  # keys/values (H, n, d), positions (n,) -> a layer
    attend: Callable[[Any, Tensor, float, str], Tensor]  # layer, q (Hq, q, d), scale, backend -> (q, Hq, d)
    full_nbytes: Callable[[Any], int]  # layer -> bytes its entries would take in full precision

    def full_bytes(self, layers: list[Any]) -> int:
        """Full-precision bytes of the entries held by ``layers`` (None = not filled yet)."""
        return sum(self.full_nbytes(layer) for layer in layers if layer is not None)


def _attend_evicting(layer: LayerKV, q: Tensor, scale: float, backend: str) -> Tensor:
    return cached_attention(q, layer, scale, backend)


def _attend_quantized(layer: QuantLayerKV, q: Tensor, scale: float, backend: str) -> Tensor:
    return layer.attend(q, scale, backend)


LAYER_STORES = ("evict", "quantized")


def layer_kind(method: Method, allocator: Allocator, budget: float) -> LayerKind:
    """The layer kind of ``method.layer_store``, after checking that method, allocator and budget go together."""
    if method.own_prefill_attention and not method.plans:
        raise UsageError(f"{type(method).__name__} sets own_prefill_attention, which the engine runs for plan methods "
                         "only (plans = True)")
    if method.layer_store == "evict" and method.plans:
        raise UsageError(f"{type(method).__name__} sets plans (per-token precisions): it needs layer_store='quantized'")
    if method.layer_store == "evict":
        return LayerKind("evict", LayerKV.from_dense, _attend_evicting, LayerKV.nbytes)
    if method.layer_store != "quantized":
        raise UsageError(f"{type(method).__name__}.layer_store={method.layer_store!r}; use one of {LAYER_STORES}")
    if method.plans and allocator.name != "uniform":
        raise UsageError(f"method={method.name} decides per token how many it keeps (its plan), so "
                         f"allocator={allocator.name} would be ignored; drop the allocator override")
    if method.plans and method.quant_spec().residual is not None:
        raise UsageError(f"{type(method).__name__} plans its tokens: its QuantSpec needs residual=None (nothing "
                         "flushed behind the plan's back)")
    if not method.compresses and not method.plans and budget != 1.0:  # a plan method caps its HIGH tokens by it
        raise UsageError(
            f"method={method.name} quantises every token and evicts none: its memory is set by its bit widths, "
            f"not by a token budget. Run it with budget=1.0 (got budget={budget})."
        )
    if not method.compresses and allocator.name != "uniform":
        raise UsageError(f"method={method.name} evicts no token, so allocator={allocator.name} would be ignored; "
                         "drop the allocator override")
    return LayerKind("quantized", partial(QuantLayerKV.from_dense, spec=method.quant_spec()), _attend_quantized,
                     QuantLayerKV.full_nbytes)

"""Iteration times from operators (Vidur's decomposition, with roofline operators instead of profiled tables).

One iteration of a replica runs ``prefill`` chunks (new tokens q over c cached tokens) and ``decode`` sequences
(one token over kv cached tokens) together:

    t = fixed + per_seq * n_seqs + max(weights / weight_bw, T * 2 * active_params / gemm_flops)
        + sum_prefill 4 * L * Hq * d * pairs(q, c) / attn_flops
        + sum_decode  kv * kv_bytes_per_token / attn_bw * kernel_factor

``pairs(q, c) = q * c + q * (q + 1) / 2`` query-key pairs of causal attention. ``kernel_factor`` is the paged
kernel's slowdown (1 for a contiguous kernel: vAttention). Transfers cost ``calls * copy_call_s + bytes / bw``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvbench.serve.arch import Arch
from kvbench.serve.hardware import Hardware


@dataclass
class Batch:
    """One iteration's work: prefill chunks (q new tokens, c cached before) and decode KV lengths."""

    prefill: list[tuple[int, int]] = field(default_factory=list)
    decode: list[int] = field(default_factory=list)

    @property
    def n_seqs(self) -> int:
        return len(self.prefill) + len(self.decode)

    @property
    def tokens(self) -> int:
        return sum(q for q, _ in self.prefill) + len(self.decode)


def causal_pairs(q: int, c: int) -> float:
    """Query-key pairs when q new tokens attend causally over c cached ones plus themselves."""
    return q * c + q * (q + 1) / 2


@dataclass(frozen=True)
class CostModel:
    arch: Arch
    hw: Hardware
    kernel_factor: float = 1.0  # decode attention slowdown of the KV layout's kernel (paged > 1)

    def gemm_s(self, tokens: int) -> float:
        if tokens == 0:
            return 0.0
        compute = tokens * 2 * self.arch.active_params_per_token / self.hw.gemm_flops
        return max(self.arch.weight_bytes / self.hw.weight_bw, compute)

    def prefill_attn_s(self, q: int, c: int) -> float:
        a = self.arch
        return 4 * a.layers * a.heads * a.head_dim * causal_pairs(q, c) / self.hw.attn_flops

    def decode_attn_s(self, kv: int) -> float:
        return kv * self.arch.kv_bytes_per_token / self.hw.attn_bw * self.kernel_factor

    def iteration_s(self, batch: Batch) -> float:
        if batch.n_seqs == 0:
            return 0.0
        return (self.hw.fixed_s + self.hw.per_seq_s * batch.n_seqs + self.gemm_s(batch.tokens)
                + sum(self.prefill_attn_s(q, c) for q, c in batch.prefill)
                + sum(self.decode_attn_s(kv) for kv in batch.decode))

    def copy_s(self, nbytes: float, calls: int, bw: float | None = None) -> float:
        """A transfer of ``nbytes`` in ``calls`` copy calls over ``bw`` (PCIe by default)."""
        return calls * self.hw.copy_call_s + nbytes / (bw or self.hw.pcie_bw)

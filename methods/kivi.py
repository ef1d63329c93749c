"""KIVI: tuning-free asymmetric 2/4-bit KV-cache quantisation with a full-precision residual window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvbench.engine.context import LayerContext
from kvbench.engine.quant import QuantSpec
from kvbench.method import Method


@dataclass
class KIVI(Method):
    """KIVI (https://arxiv.org/abs/2402.02750, code jy-yuan/KIVI ``models/llama_kivi.py``): every token is kept;
    keys are quantised per channel over groups of ``group_size`` tokens, values per token over groups of
    ``group_size`` channels, min-max asymmetric, and the newest tokens stay in full precision (the residual).

    Flushes as the authors' code (``kvbench.engine.quant``): prefill quantises the first ``floor(n/R)·R`` keys and
    all but the last R values; while decoding, the key residual is quantised whole once it holds R tokens and the
    oldest value leaves the R-token value window each step. Prefill attention and every step's attention before
    its flush use the full-precision residual, as in KIVI.

    Defaults are those of the authors' LongBench results (docs/long_bench.md): group size 32, residual 128, for
    KIVI-2 (``method=kivi_2bit``) and KIVI-4 (``method=kivi``, the authors' recommendation for GQA models).
    The budget is not a token budget here: run with ``budget=1.0`` (the engine refuses others).

    Parameters:
        k_bits, v_bits: 2 | 4 | 8. group_size: tokens per key group and channels per value group (a head narrower
        than the group is one value group). residual_length: R, a multiple of group_size.
    """

    name: str = "kivi"
    k_bits: int = 4
    v_bits: int = 4
    group_size: int = 32
    residual_length: int = 128

    compresses: ClassVar[bool] = False  # no eviction: every token is kept, at low precision
    layer_store: ClassVar[str] = "quantized"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.quant_spec()  # validates the bit widths, group size and residual with a clear message

    def quant_spec(self) -> QuantSpec:
        return QuantSpec(self.k_bits, self.v_bits, self.group_size, self.residual_length)

    def score(self, ctx: LayerContext) -> Tensor:
        """Never called (``compresses`` is False): every token is kept."""
        return torch.ones(ctx.n_kv_heads, ctx.n, device=ctx.keys.device)

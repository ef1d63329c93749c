"""FullKV: no compression, the reference every method is compared with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvbench.engine.context import LayerContext
from kvbench.method import Method


@dataclass
class FullKV(Method):
    """Keeps the whole cache whatever the budget (methods_core §2.1); prompts and decoding are unchanged.

    Runs through the same engine, storage and attention as every other method, so its numbers are the exact
    reference for them (budget 1.0 of any method gives bit-identical generations).
    """

    name: str = "fullkv"

    compresses: ClassVar[bool] = False

    def score(self, ctx: LayerContext) -> Tensor:
        return torch.ones(ctx.n_kv_heads, ctx.n, device=ctx.keys.device)

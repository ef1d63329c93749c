"""Layer-DefensiveKV: DefensiveKV's scores with one top-k across all layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kvbench.engine.context import LayerContext
from methods.defensivekv import DefensiveKV


@dataclass
class LayerDefensiveKV(DefensiveKV):
    """Layer-DefensiveKV (https://github.com/FFY0/DefensiveKV, ``efficient_layer_defensivekv_press.py``), §5.2.

    Scores are DefensiveKV's (defensive max aggregation, value-norm weighting, stage-1 forced tokens set to the
    layer's maximum), and the window tokens also get the layer's maximum score, so the score covers all n tokens.
    The ``global_flat`` allocator then takes one top-(L * H * C) over every (layer, head, token) score of the
    model and keeps, per layer and head, exactly the picked entries. As in the authors' code the forced values are
    per-layer maxima, so a layer with a small score scale can lose its window, its forced tokens or whole heads, and
    compression happens only after the last layer (the prefill holds the full cache: no peak-memory saving).

    Deviation: the model-wide budget is L * H * floor(n * budget) entries instead of int(n * (1 - r) * H * L), at
    most L * H entries apart.
    """

    name: str = "layer_defensivekv"

    keeps_window: ClassVar[bool] = False  # windows compete across layers (authors' behaviour)

    def score(self, ctx: LayerContext) -> Tensor:
        s = super().score(ctx)  # (H, n - w); the engine only scores layers with n > w
        window = s.new_full((s.shape[0], ctx.window), float(s.max()))  # the window is forced like stage-1 tokens
        return torch.cat([s, window], dim=1)  # (H, n)

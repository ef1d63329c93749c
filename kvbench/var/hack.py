"""HACK (head-aware KV compression for visual autoregressive models, https://arxiv.org/abs/2504.09261) on the VAR
runner: offline head classification, asymmetric per-head budgets and pattern-specific eviction at every scale.

The authors' code is not public (methods_more §6): the structure follows the paper's abstract and a summary; every
formula below that they leave open is a named parameter, documented as our choice ([R]).

1. **Classification** (offline, ``scripts/calibrate_hack.py``): for each (block, head), the current scale's
   attention A (q x n) over the full cache, column means a_j = mean_i A_ij, and the statistic
   ``var_j(n a_j)`` (the variance of the column means, normalised so that uniform attention gives 0); averaged
   over calibration images, both CFG streams and the steps >= ``min_step``. Vertical heads (every query on the same
   few keys) have a large statistic, (multi-)diagonal heads a small one. ``split``: ``gap`` labels as *contextual*
   the heads above the largest gap of the sorted log10 statistics [R]; a number f in (0, 1) labels the top f of
   the heads instead.
2. **Asymmetric budgets**: per block, contextual heads get ``budget_ratio`` times the tokens of a structural head
   [R: the paper gives no ratio], ``n_c B_c + n_s B_s = H B`` exactly (``kvbench.var.allot.proportional``, capped by
   what each head holds), for every CFG stream.
3. **Contextual heads** keep the condition tokens (``keep_condition``) and then the top keys by attention mass
   from the current scale's queries (column sums of A).
4. **Structural heads** keep the most recent scale whole, then older scales newest first (the oldest scales are
   evicted first); within the scale where the budget runs out, the keys with the most attention from the current
   scale, i.e. the aligned positions of a diagonal head [R]; with ``spread`` coarse lattice points first (a
   spatially spread subset, so that every region keeps a key for the next scale's queries; worse on
   kvbench-tiny-var, docs/var.md). The score is lexicographic in (scale index, [lattice level,] mass): column sums
   are <= q.
5. Applied after every scale step (``kvbench.var.compress``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvbench.errors import UsageError
from kvbench.var.allot import proportional
from kvbench.var.compress import ScaleContext, VarMethod
from kvbench.var.load import ASSETS

CALIBRATION_FILE = "hack_calibration.json"
VERSION = 1


@dataclass
class HackParams:
    """HACK's parameters (``conf/method/hack.yaml``); see the module docstring for what each one decides.

    Attributes:
        calibration: ``auto`` (``<assets>/<model>/hack_calibration.json`` or ``$KVBENCH_CALIBRATION_DIR/hack/
            <model>.json``) or the path of a file written by ``scripts/calibrate_hack.py``.
        model: the model's name, for ``auto``.
        split: ``gap`` or the fraction of heads labelled contextual.
        budget_ratio: B_contextual / B_structural (> 0).
        keep_condition: contextual heads keep the condition tokens first.
        spread: structural heads rank the tokens of a scale by ``lattice_level`` before attention mass.
    """

    name: str = "hack"
    calibration: str = "auto"
    model: str = ""
    split: Any = "gap"
    budget_ratio: float = 0.5
    keep_condition: bool = True
    spread: bool = False

    def check(self) -> None:
        if not self.budget_ratio > 0:
            raise UsageError(f"hack: budget_ratio must be > 0 (B_contextual / B_structural), got {self.budget_ratio}")
        if self.split != "gap" and not (isinstance(self.split, int | float) and 0 < float(self.split) < 1):
            raise UsageError(f"hack: split must be 'gap' or a fraction in (0, 1), got {self.split!r}")


def head_statistic(ctx: ScaleContext) -> Tensor:
    """(H,) var_j(n a_j) of the current scale's column-mean attention, averaged over the CFG streams."""
    col = ctx.attention().mean(1) * ctx.lens[:, None]  # (R, n): n a_j, 0 on padding
    mean = col.sum(1, keepdim=True) / ctx.lens[:, None]
    var = ((col - mean) ** 2 * ctx.valid).sum(1) / ctx.lens  # (R,)
    return var.view(ctx.n_streams, ctx.n_heads).mean(0)


def labels_from(statistic: Tensor, split: Any) -> Tensor:
    """(blocks, H) statistics -> bool (blocks, H), True = contextual."""
    logs = statistic.clamp_min(1e-12).log10().flatten()
    order = logs.argsort()
    if split == "gap":
        gaps = logs[order][1:] - logs[order][:-1]
        n_struct = int(gaps.argmax()) + 1
    else:
        n_struct = len(logs) - max(1, round(float(split) * len(logs)))
    out = torch.ones(len(logs), dtype=torch.bool)
    out[order[:n_struct]] = False
    return out.view(statistic.shape)


LATTICE_LEVELS = 8  # enough for scales up to 256 tokens a side


def lattice_level(ctx: ScaleContext) -> Tensor:
    """(R, n) for a token at row i, column j of its scale: the largest k <= LATTICE_LEVELS with 2^k dividing both
    i and j (the scale's origin has the top level), so that any prefix of this order is spread over the image."""
    scales = ctx.token_scale().clamp_min(0)
    starts = torch.tensor([ctx.spans[f"scale_{i}"][0] for i in range(len(ctx.patch_nums))], device=scales.device)
    sides = torch.tensor(ctx.patch_nums, device=scales.device)
    local = ctx.positions.clamp_min(0) - starts[scales]
    both = (local // sides[scales]) | (local % sides[scales])  # bitwise or of row and column
    level = torch.zeros_like(both)
    for k in range(1, LATTICE_LEVELS + 1):
        level += (both % (1 << k) == 0).long()
    return level.double()


def calibration_path(params: HackParams) -> Path:
    if params.calibration != "auto":
        return Path(params.calibration)
    env = os.environ.get("KVBENCH_CALIBRATION_DIR")
    if env and (Path(env) / "hack" / f"{params.model}.json").exists():
        return Path(env) / "hack" / f"{params.model}.json"
    return ASSETS / params.model / CALIBRATION_FILE


def load_calibration(params: HackParams) -> dict[str, Any]:
    path = calibration_path(params)
    if not path.is_file():
        raise UsageError(f"hack: no head calibration for model {params.model!r} at {path}; write one with "
                         f"python scripts/calibrate_hack.py --model {params.model} (or set method.calibration=PATH)")
    data = json.loads(path.read_text())
    if data.get("version") != VERSION or data.get("method") != "hack":
        raise UsageError(f"hack: {path} is not a version-{VERSION} HACK calibration; rewrite it with calibrate_hack.py")
    return data


class HackScorer(VarMethod):
    """HACK's VAR-side logic over a loaded calibration (``labels``: bool (blocks, H), True = contextual)."""

    def __init__(self, params: HackParams, labels: Tensor) -> None:
        params.check()
        self.params, self.labels = params, labels

    @classmethod
    def from_params(cls, params: HackParams, n_blocks: int, n_heads: int) -> HackScorer:
        data = load_calibration(params)
        stat = torch.tensor(data["statistic"], dtype=torch.float64)
        if tuple(stat.shape) != (n_blocks, n_heads):
            raise UsageError(f"hack: the calibration has {tuple(stat.shape)} (blocks, heads), the model "
                             f"({n_blocks}, {n_heads}); recalibrate for this model")
        return cls(params, labels_from(stat, params.split))

    def head_labels(self, ctx: ScaleContext) -> Tensor:
        """(R,) True where the row's head is contextual."""
        return self.labels[ctx.block_idx].to(ctx.keys.device).repeat(ctx.n_streams)

    def score(self, ctx: ScaleContext) -> Tensor:
        mass = ctx.mass().double()  # (R, n)
        contextual = mass.clone()
        if self.params.keep_condition:
            start, end = ctx.spans["condition"]
            contextual[(ctx.positions >= start) & (ctx.positions < end)] = math.inf
        return torch.where(self.head_labels(ctx)[:, None], contextual, self.structural(ctx, mass))

    def structural(self, ctx: ScaleContext, mass: Tensor) -> Tensor:
        """Newer scales first; within a scale coarse lattice points first (``spread``), then attention mass."""
        unit, mass = ctx.queries.shape[1] + 1.0, mass.double()  # column sums are <= q; float64 keeps their ties
        within = mass + lattice_level(ctx) * unit if self.params.spread else mass
        return ctx.token_scale().double() * unit * (LATTICE_LEVELS + 1) + within

    def counts(self, ctxs: list[ScaleContext], keep: int) -> list[Tensor]:
        out = []
        for ctx in ctxs:
            weights = torch.where(self.labels[ctx.block_idx], self.params.budget_ratio, 1.0)  # (H,) on the CPU
            caps = ctx.lens.view(ctx.n_streams, ctx.n_heads)
            out.append(torch.cat([proportional(weights, caps[s], ctx.n_heads * keep) for s in range(ctx.n_streams)]))
        return out

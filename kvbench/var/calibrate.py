"""HACK's offline head classification: the attention-variance statistic of every (block, head), measured on
calibration images generated with the full cache (``scripts/calibrate_hack.py`` writes the file the method loads)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kvbench.var.bundle import Bundle, VarBundle
from kvbench.var.compress import ScaleContext, VarMethod
from kvbench.var.hack import VERSION, head_statistic, labels_from
from kvbench.var.model import VAR
from kvbench.var.quant import VQVAE


@dataclass
class VarianceProbe(VarMethod):
    """Keeps everything; records ``head_statistic`` of every block at every step >= ``min_step``."""

    min_step: int
    rows: dict[int, list[Tensor]] = field(default_factory=dict)
    maps: dict[int, Tensor] = field(default_factory=dict)  # block -> (H, q, n) last step, stream 0, first image

    def counts(self, ctxs: list[ScaleContext], keep: int) -> list[Tensor]:
        return [ctx.lens for ctx in ctxs]

    def score(self, ctx: ScaleContext) -> Tensor:
        if ctx.step >= self.min_step:
            self.rows.setdefault(ctx.block_idx, []).append(head_statistic(ctx))
        if ctx.step == len(ctx.patch_nums) - 1 and ctx.block_idx not in self.maps:
            self.maps[ctx.block_idx] = ctx.attention()[: ctx.n_heads].cpu()
        return ctx.mass()

    def statistic(self) -> Tensor:
        """(blocks, H) mean over every recorded image and step."""
        return torch.stack([torch.stack(self.rows[b]).mean(0) for b in sorted(self.rows)])


def weights_digest(var: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(var.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def calibrate(var: VAR, vae: VQVAE, classes: list[int], seeds: list[int], min_step: int,
              sampling: dict[str, Any], probe: VarianceProbe | None = None) -> Tensor:
    """(blocks, H) statistics of a VAR model averaged over classes x seeds (batch of all classes per seed)."""
    return calibrate_bundle(VarBundle(var, vae), classes, seeds, min_step, sampling, probe)


def calibrate_bundle(bundle: Bundle, conditions: list[Any], seeds: list[int], min_step: int,
                     sampling: dict[str, Any], probe: VarianceProbe | None = None) -> Tensor:
    """(blocks, H) statistics averaged over conditions (classes or prompts) x seeds, one batch per seed."""
    n_scales = len(bundle.shape[2])
    if not 0 <= min_step < n_scales:
        raise ValueError(f"min_step must be in [0, {n_scales})")
    probe = probe or VarianceProbe(min_step)
    for seed in seeds:
        bundle.sample(list(conditions), seed, method=probe, budget=1.0, decode=False, **sampling)
    return probe.statistic()


def record(model: str, var: nn.Module, statistic: Tensor, settings: dict[str, Any]) -> dict[str, Any]:
    labels = labels_from(statistic, "gap")
    return {"method": "hack", "version": VERSION, "model": model, "weights_sha256": weights_digest(var),
            "statistic": [[round(float(x), 6) for x in row] for row in statistic],
            "labels_gap": [["contextual" if c else "structural" for c in row] for row in labels.tolist()],
            "settings": settings}


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1) + "\n"


def draw(maps: dict[int, Tensor], data: dict[str, Any], spans: dict[str, tuple[int, int]], path: str) -> None:
    """One panel per (block, head): the last step's attention (queries x keys, first image, conditional stream),
    scale boundaries dotted, titled with the label and the statistic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks, heads = len(maps), maps[0].shape[0]
    fig, axes = plt.subplots(blocks, heads, figsize=(2.6 * heads, 2.4 * blocks), squeeze=False)
    bounds = [end for name, (_, end) in spans.items() if name.startswith("scale_")][:-1]
    for b in range(blocks):
        for h in range(heads):
            ax = axes[b][h]
            ax.imshow(maps[b][h].numpy() ** 0.5, aspect="auto", cmap="magma", interpolation="nearest")
            for x in bounds:
                ax.axvline(x - 0.5, color="white", lw=0.4, ls=":")
            ax.set_title(f"block {b} head {h}: {data['labels_gap'][b][h]}\nstatistic {data['statistic'][b][h]:.3g}",
                         fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[-1][0].set_xlabel("keys (all cached scales)", fontsize=8)
    axes[-1][0].set_ylabel("last-scale queries", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

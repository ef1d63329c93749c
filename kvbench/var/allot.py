"""Integer budgets that add up exactly: proportional shares with per-item caps (largest remainders)."""

from __future__ import annotations

import torch
from torch import Tensor


def proportional(weights: Tensor, caps: Tensor, total: int) -> Tensor:
    """Non-negative integers a_i <= caps_i with sum = min(total, sum caps), a_i ~ weights_i (water-filling: items
    at their cap give their share to the others), rounded by largest remainder (ties: lower index first).
    Computed on the CPU (a few numbers), returned on ``caps``' device."""
    device, caps, weights = caps.device, caps.long().cpu(), weights.cpu()
    total = int(min(total, int(caps.sum())))
    w = weights.double().clamp_min(0)
    share = torch.zeros_like(w)
    free = caps > 0
    for _ in range(len(w) + 1):  # each round either fits everything or caps at least one more item
        room = total - float(share[~free].sum())
        ws = float(w[free].sum())
        if ws <= 0:
            share[free] = room / max(1, int(free.sum()))
        else:
            share[free] = w[free] / ws * room
        over = free & (share > caps)
        if not bool(over.any()):
            break
        share[over] = caps[over].double()
        free &= ~over
    out = share.floor().long().clamp(max=caps)
    rest = total - int(out.sum())
    frac = share - out.double()
    frac[out >= caps] = -1.0
    order = torch.argsort(-frac, stable=True)
    out[order[:rest]] += 1
    return out.to(device)

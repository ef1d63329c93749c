"""ZipVL v2 (``method=zipvl_evict``): the same important tokens as ZipVL, the others evicted instead of quantised."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvbench.engine.packed import FULL
from kvbench.engine.quant import EVICT
from methods.zipvl import ZipVL


@dataclass
class ZipVLEvict(ZipVL):
    """ZipVL v2 (https://arxiv.org/abs/2410.08584v2): adaptive important tokens per layer (tau), sparse prefill
    attention over them, and the unimportant tokens **evicted** from the KV cache (no quantisation); the important
    ones are kept in full precision (``bits_high: 16``). Every 100 new tokens the newest ones are re-compressed
    the same way.

    Budget (a kvbench choice, not in the paper): ``budget=1.0`` is the paper's rule (as many tokens as tau says);
    a smaller budget caps the important tokens of every layer at the budget (``min(p_tau, budget * n)``), so that
    ZipVL can be compared with the other methods at equal budgets.
    """

    name: str = "zipvl_evict"
    bits_high: int = FULL

    compresses: ClassVar[bool] = True  # tokens are evicted
    unimportant: ClassVar[int] = EVICT

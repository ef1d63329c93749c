"""HACK: head-aware KV compression for visual autoregressive models (runs on ``family: var`` models)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kvbench.engine.context import LayerContext
from kvbench.errors import UsageError
from kvbench.identity import sha256_file
from kvbench.method import Method
from kvbench.var.hack import HackParams, calibration_path


@dataclass
class HACK(HackParams, Method):
    """HACK (Qin et al., https://arxiv.org/abs/2504.09261, AAAI'26): contextual heads (vertical attention) keep the
    condition and their heaviest keys, structural heads (multi-diagonal) the most recent scale and the aligned
    positions of older ones, with asymmetric per-head budgets averaging the budget; heads are classified offline by
    attention variance (``scripts/calibrate_hack.py``). The algorithm and every parameter are in
    ``kvbench.var.hack`` (the authors' code is not public; the open formulas are our choices, named there).

    Runs on the VAR runner only (``python -m kvbench.var model=kvbench-tiny-var task=var_class method=hack``): a
    text model has no scales or head classification, and is refused with one message.
    """

    name: str = "hack"
    family: ClassVar[str] = "var"  # runs on the VAR runner (kvbench.var), not on the text engine

    def __post_init__(self) -> None:
        Method.__post_init__(self)
        self.check()

    def score(self, ctx: LayerContext) -> Tensor:
        raise UsageError("method=hack compresses visual autoregressive models only: use a VAR model, e.g. "
                         "python -m kvbench.var model=kvbench-tiny-var task=var_class method=hack budget=0.3")

    def inputs(self) -> dict[str, str]:
        path = calibration_path(self)
        return {"hack_calibration": sha256_file(path)} if path.is_file() else {}

"""Base class of every KV-cache method: a small dataclass that scores one layer's cached tokens.

A method answers *which* tokens matter (``score``); *how many* each layer and head keeps is decided by a separate
allocator (``kvbench.budget``), and the mechanics (hooks, top-k, gather, positions, ragged storage) live in the
engine. Adding a method = ``methods/<name>.py`` (a subclass) + ``conf/method/<name>.yaml``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from kvbench.engine.context import LayerContext


@dataclass
class Method(ABC):
    """Scores cached tokens at prefill; higher means keep.

    Attributes:
        name: the method's name (the config file stem; used in run directories).
        window: observation window / always-kept recent tokens (clamped by the engine to the per-head budget).
    """

    name: str = ""
    window: int = 0

    compresses: ClassVar[bool] = True

    @abstractmethod
    def score(self, ctx: LayerContext) -> Tensor:
        """Scores of the non-window tokens: (H_kv, n - ctx.window). The last ``ctx.window`` tokens are always kept.

        A method may also return (H_kv, n); then window tokens compete like any other token.
        """

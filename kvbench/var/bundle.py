"""A loaded next-scale model as the runner, the calibration and the methods see it: VAR (class labels) or
Infinity (text prompts), one ``sample`` call per batch over the same cache and compression seam.

``model.arch`` picks it (``var``, the default, or ``infinity``); both are ``family: var`` models.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from kvbench.errors import UsageError
from kvbench.var.compress import VarMethod
from kvbench.var.generate import Generation, generate

ARCHS = ("var", "infinity")


class Bundle(ABC):
    """The networks of one model and how to sample a batch of conditions with them."""

    arch: ClassVar[str]
    condition: ClassVar[str]  # what the task must give: "classes" or "prompts"

    @property
    @abstractmethod
    def transformer(self) -> nn.Module:
        """The network whose heads the methods compress (its weights identify a calibration)."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int, tuple[int, ...]]:
        """(blocks, heads, scale sides)."""

    @abstractmethod
    def sample(self, conditions: list[Any], seed: int, method: VarMethod | None = None, budget: float = 1.0,
               decode: bool = True, **sampling: Any) -> Generation:
        """One batch (one image per condition) with one seeded generator."""

    @property
    def num_classes(self) -> int | None:
        """The class count that bounds a class task (None for text-conditioned models)."""
        return None

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device


@dataclass
class VarBundle(Bundle):
    var: Any
    vae: Any
    arch: ClassVar[str] = "var"
    condition: ClassVar[str] = "classes"

    @property
    def transformer(self) -> nn.Module:
        return self.var

    @property
    def shape(self) -> tuple[int, int, tuple[int, ...]]:
        return self.var.cfg.depth, self.var.cfg.num_heads, self.var.cfg.patch_nums

    @property
    def num_classes(self) -> int:
        return self.var.cfg.num_classes

    def sample(self, conditions: list[Any], seed: int, method: VarMethod | None = None, budget: float = 1.0,
               decode: bool = True, **sampling: Any) -> Generation:
        labels = torch.tensor([int(c) for c in conditions], device=self.device)
        return generate(self.var, self.vae, labels, seed, method=method, budget=budget, decode=decode, **sampling)


@dataclass
class InfinityBundle(Bundle):
    model: Any
    vae: Any
    text: Any
    arch: ClassVar[str] = "infinity"
    condition: ClassVar[str] = "prompts"

    @property
    def transformer(self) -> nn.Module:
        return self.model

    @property
    def shape(self) -> tuple[int, int, tuple[int, ...]]:
        return self.model.cfg.depth, self.model.cfg.num_heads, self.vae.quantizer.sides

    def sample(self, conditions: list[Any], seed: int, method: VarMethod | None = None, budget: float = 1.0,
               decode: bool = True, **sampling: Any) -> Generation:
        from kvbench.var.infinity.generate import generate_infinity

        return generate_infinity(self.model, self.vae, self.text, [str(c) for c in conditions], seed, method=method,
                                 budget=budget, decode=decode, **sampling)


def load_bundle(spec: Any, device: str | torch.device = "cpu") -> Bundle:
    """From a ``conf/model`` node (``family: var``; ``arch: var`` or ``infinity``)."""
    arch = str(spec.get("arch", "var"))
    if arch not in ARCHS:
        raise UsageError(f"model {spec.get('name')!r}: arch={arch!r} unknown; next-scale archs: {list(ARCHS)}")
    if arch == "infinity":
        from kvbench.var.infinity.load import load_infinity

        return InfinityBundle(*load_infinity(spec, device))
    from kvbench.var.load import load_model

    return VarBundle(*load_model(spec, device))

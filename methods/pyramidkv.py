"""PyramidKV: SnapKV scores with a pyramid-shaped layer budget (the allocator does the pyramid)."""

from __future__ import annotations

from dataclasses import dataclass

from methods.snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """PyramidKV (https://arxiv.org/abs/2406.02069), methods_core §2.5.

    Scoring is SnapKV's (same fields and defaults as ``snapkv``); the layer schedule comes from the ``pyramid``
    allocator (beta = 20: lower layers keep more, upper layers fewer; floored step as in the authors' code), which
    ``conf/method/pyramidkv.yaml`` selects. KVCache-Factory runs it with window 8 and falls back to a uniform budget
    when the prompt is short (``allocator.kvf_fallback=true``); the AdaKV/CompressKV ports have no fallback.
    """

    name: str = "pyramidkv"

"""Ada-SnapKV: SnapKV scores with AdaKV's head-adaptive budgets inside each layer."""

from __future__ import annotations

from dataclasses import dataclass

from methods.snapkv import SnapKV


@dataclass
class AdaKV(SnapKV):
    """Ada-SnapKV (https://arxiv.org/abs/2407.11550), FFY0/AdaKV ``AdaptiveSnapKVCluster``, methods_core §2.6.

    Scores: mean over the 32 window queries, GQA mean (``--gqa_support``) before max-pooling with kernel 7. The
    ``head_adaptive`` allocator (selected by ``conf/method/adakv.yaml``) takes one top-(H * b) over the layer's
    heads and applies the safeguard alpha = 0.2 (the LongBench scripts' ``floor_alpha``), so heads keep different
    numbers of tokens and the cache physically holds only those (flattened varlen storage, like the authors'
    CUDA cache; not kvpress's masking, which keeps every byte).

    Deviation: per KV head (the AdaKV repo's GQA mode); its default per-query-head cache holds G times the memory.
    """

    name: str = "adakv"

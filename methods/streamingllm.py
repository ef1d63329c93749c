"""StreamingLLM: attention sinks plus the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvbench.engine.context import LayerContext
from kvbench.method import Method


@dataclass
class StreamingLLM(Method):
    """Keep the first ``n_sink`` tokens and the most recent ones (https://arxiv.org/abs/2309.17453).

    Prefill-time variant used by KVCache-Factory, AdaKV and kvpress (methods_core §2.2): with a per-head budget of
    B tokens it keeps [0, n_sink) and the last B - n_sink tokens; there is no rolling eviction while decoding and
    keys are not re-rotated (kept tokens keep their original positions, as in kvpress without KeyRerotationPress).

    Parameters:
        n_sink: 4, the sink count of all three reference implementations. (CompressKV's own StreamingLLM keeps
            B - 8 "sinks" and 8 recent tokens; that variant is not reproduced here.)
    """

    name: str = "streamingllm"
    n_sink: int = 4

    def score(self, ctx: LayerContext) -> Tensor:
        pos = torch.arange(ctx.n, device=ctx.keys.device, dtype=torch.float32)  # (n,) later = higher
        pos[: self.n_sink] += ctx.n  # sinks outrank every recent token
        return pos.expand(ctx.n_kv_heads, ctx.n)  # (H_kv, n)

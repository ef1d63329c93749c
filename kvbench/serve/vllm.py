"""The vLLM-like baseline: continuous batching, 16-token paged blocks, FCFS, preemption by recompute or swap.

As vLLM v0 (0.4-0.6, the version FastSwitch, vAttention and EPD compare with): prefill-first iterations without
chunked prefill, a LIFO free-block list, a 1 % watermark, synchronous swaps of one copy per block, layer and K/V,
no prefix caching. Decode attention uses a paged kernel (``hardware.paged_attn_factor``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import simpy

from kvbench.serve.core import Replica
from kvbench.serve.cost import CostModel
from kvbench.serve.memory import PagedBlocks
from kvbench.serve.system import GiB, SimContext, SimResult, System, drive, replica_result
from kvbench.serve.workload import Request


@dataclass
class VLLM(System):
    name: str = "vllm"
    preemption: str | None = None  # overrides server.preemption
    scheduler: str | None = None  # overrides server.scheduler

    def server(self, ctx: SimContext) -> Any:
        changes = {k: v for k, v in (("preemption", self.preemption), ("scheduler", self.scheduler)) if v}
        return replace(ctx.server, max_seqs=ctx.max_seqs(), **changes)

    def space(self, ctx: SimContext, server: Any) -> Any:
        block = server.block_tokens * ctx.arch.kv_bytes_per_token
        return PagedBlocks(int(ctx.kv_bytes() // block), server.block_tokens, ctx.arch.kv_bytes_per_token)

    def cost(self, ctx: SimContext) -> CostModel:
        return CostModel(ctx.arch, ctx.hw, kernel_factor=ctx.hw.paged_attn_factor)

    def replica(self, env: simpy.Environment, ctx: SimContext) -> Replica:
        server = self.server(ctx)
        return Replica(env, self.cost(ctx), self.space(ctx, server), server, server.swap_gb * GiB)

    def simulate(self, requests: list[Request], ctx: SimContext) -> SimResult:
        env = simpy.Environment()
        rep = self.replica(env, ctx)
        drive(env, rep, requests)
        env.run()
        return replica_result(rep, requests, ctx)

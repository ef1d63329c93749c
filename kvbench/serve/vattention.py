"""vAttention (Prabhu et al., ASPLOS'25; microsoft/vattention): contiguous virtual KV with demand-paged physical
memory instead of PagedAttention.

In the simulator (:class:`VAttention`): a sequence holds ``2 * layers`` contiguous rows, each backed by whole pages
of ``page_kb`` (2 MB with the stock driver, 64 KB with vAttention's modified one;
:class:`kvbench.serve.memory.VirtualPages`), so its internal fragmentation is up to a page per row instead of up
to a block; decode attention runs the unchanged contiguous kernel (``kernel_factor = 1``) where vLLM pays
``hardware.paged_attn_factor``. Mapping a page costs ``hardware.page_map_s``: synchronously on the iteration, or,
``overlap_mapping`` (vAttention's ``step_async``), in the background during the previous iteration, so only the
part longer than that iteration is paid. Preemption is by recompute (vAttention does not swap).

For real, on CPU (:mod:`kvbench.serve.vmem`, run with every simulation and stored under ``real_cpu``): the
demand-paged store's physical memory against reserved and paged, and SDPA on the contiguous view vs a paged
gather. Deviation: vAttention's deferred reclamation (reusing a finished request's pages for the next one in the
slot) is not modelled; mapping and unmapping are both counted as mapping time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import simpy

from kvbench.errors import UsageError
from kvbench.serve.core import Replica
from kvbench.serve.cost import Batch, CostModel
from kvbench.serve.memory import VirtualPages
from kvbench.serve.system import GiB, SimContext, SimResult, System, drive, replica_result
from kvbench.serve.vllm import VLLM
from kvbench.serve.workload import Request


class MappingReplica(Replica):
    """A replica that pays for the physical pages each iteration maps."""

    def __init__(self, *args: Any, overlap: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.overlap, self.mapped_seen, self.last_iter_s, self.map_s = overlap, 0, 0.0, 0.0

    def plan(self) -> tuple[Batch, list[Any]]:
        batch, members = super().plan()
        new = self.space.mapped_total - self.mapped_seen
        self.mapped_seen = self.space.mapped_total
        t_map = new * self.cost.hw.page_map_s
        self.map_s += t_map
        self.extra_s = max(t_map - self.last_iter_s, 0.0) if self.overlap else t_map
        self.last_iter_s = self.cost.iteration_s(batch)
        return batch, members


@dataclass
class VAttention(VLLM):
    name: str = "vattention"
    headline: ClassVar[tuple[str, ...]] = ("decode_tok_s", "fragmentation", "max_batch", "makespan_s")
    page_kb: int = 2048
    overlap_mapping: bool = True

    def space(self, ctx: SimContext, server: Any) -> Any:
        page = self.page_kb * 1024
        if page < ctx.arch.kv_bytes_per_token_layer:
            raise UsageError(f"page_kb={self.page_kb} is smaller than one token of one layer's K")
        return VirtualPages(int(ctx.kv_bytes()), page, ctx.arch.kv_bytes_per_token_layer, ctx.arch.layers)

    def cost(self, ctx: SimContext) -> CostModel:
        return CostModel(ctx.arch, ctx.hw, kernel_factor=1.0)

    def replica(self, env: simpy.Environment, ctx: SimContext) -> Replica:
        server = self.server(ctx)
        if server.preemption != "recompute":
            raise UsageError("vAttention preempts by recompute (its virtual tensors are not swapped); "
                             "use server.preemption=recompute")
        return MappingReplica(env, self.cost(ctx), self.space(ctx, server), server, server.swap_gb * GiB,
                              overlap=self.overlap_mapping)

    def simulate(self, requests: list[Request], ctx: SimContext) -> SimResult:
        env = simpy.Environment()
        rep = self.replica(env, ctx)
        drive(env, rep, requests)
        env.run()
        held = sum(r.prompt + r.output for r in requests) * ctx.arch.kv_bytes_per_token
        return replica_result(rep, requests, ctx, page_bytes=rep.space.page_bytes, pages_mapped=rep.space.mapped_total,
                              page_map_s=rep.map_s, kv_token_bytes=held)

    def measurements(self, ctx: SimContext) -> dict[str, Any]:
        from kvbench.serve.vmem import demo

        return demo()

    def baselines(self) -> dict[str, System]:
        return {"vllm": VLLM(name="vllm"),
                "vattention_64kb": replace(self, name="vattention_64kb", page_kb=64),
                "vattention_sync": replace(self, name="vattention_sync", overlap_mapping=False),
                "vattention_64kb_sync": replace(self, name="vattention_64kb_sync", page_kb=64,
                                                overlap_mapping=False)}

"""FastSwitch (Shen, Li, Gao; arXiv 2411.18424): fairness scheduling with cheap context switches.

No code of the authors is public (methods_more §7.1); this is the mechanism as the paper's abstract describes it,
on our replica:

* priority-based preemptive scheduling (VTC-style fairness, re-ranked every ``rerank_every`` iterations) that
  swaps lower-priority sequences out: the *same* scheduler runs in the vLLM baseline it is compared with, so the
  difference is the cost of each switch;
* the dynamic block-group manager (:class:`kvbench.serve.memory.BlockGroups`): a prompt's blocks in one contiguous
  group, later growth in groups of ``group_blocks``, so a swap is a few large copies instead of one per block;
* the asynchronous swap manager: copies run on a copy stream overlapping compute (a sequence waits only for its
  own copy, never the whole batch);
* KV reuse across turns: host copies stay valid, so a swap-out writes only new blocks and a conversation's next
  turn swaps its history in instead of recomputing it.

Deviations: one copy stream (the paper's multi-threaded manager overlaps several; bandwidth is shared either way);
the group size is fixed rather than adapted to free memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

from kvbench.serve.memory import BlockGroups
from kvbench.serve.system import SimContext, System
from kvbench.serve.vllm import VLLM


@dataclass
class FastSwitch(VLLM):
    name: str = "fastswitch"
    headline: ClassVar[tuple[str, ...]] = ("ttft_s_p95", "ttft_s_p99", "tbt_s_p99.9", "copy_calls", "swap_stall_s")
    group_blocks: int = 8
    async_swap: bool = True
    reuse_kv: bool = True
    rerank_every: int = 16
    swap_gb: float = 16.0  # host memory for KV (the baselines get the same)

    def server(self, ctx: SimContext) -> Any:
        return replace(super().server(ctx), preemption="swap", scheduler="priority", rerank_every=self.rerank_every,
                       async_swap=self.async_swap, reuse_kv=self.reuse_kv, swap_gb=self.swap_gb)

    def space(self, ctx: SimContext, server: Any) -> Any:
        block = server.block_tokens * ctx.arch.kv_bytes_per_token
        return BlockGroups(int(ctx.kv_bytes() // block), server.block_tokens, ctx.arch.kv_bytes_per_token,
                           group_blocks=self.group_blocks)

    def baselines(self) -> dict[str, System]:
        """vLLM with the same priority scheduler and swap preemption, and FastSwitch with one mechanism at a time."""
        base = PriorityVLLM(name="vllm", rerank_every=self.rerank_every, swap_gb=self.swap_gb)
        return {"vllm": base,
                "groups_only": replace(self, name="groups_only", async_swap=False, reuse_kv=False),
                "groups_async": replace(self, name="groups_async", reuse_kv=False)}


@dataclass
class PriorityVLLM(VLLM):
    """vLLM's block manager and synchronous per-block swaps under the fairness scheduler."""

    name: str = "vllm"
    rerank_every: int = 16
    swap_gb: float = 16.0

    def server(self, ctx: SimContext) -> Any:
        return replace(super().server(ctx), preemption="swap", scheduler="priority", rerank_every=self.rerank_every,
                       swap_gb=self.swap_gb)

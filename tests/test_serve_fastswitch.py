"""FastSwitch: block-group copy calls and KV reuse on hand-made cases, and its tail latencies below vLLM's (same
priority scheduler) under preemption pressure."""

from __future__ import annotations

import copy

import simpy
from test_serve_helpers import ctx_for

from kvbench.serve.core import Replica, Seq, ServerConfig
from kvbench.serve.cost import CostModel
from kvbench.serve.fastswitch import FastSwitch
from kvbench.serve.memory import PagedBlocks
from kvbench.serve.workload import Request, build_requests


def test_reuse_writes_only_blocks_added_since_the_last_swap_out() -> None:
    _, ctx = ctx_for("hardware=a100-80gb")
    env = simpy.Environment()
    space = PagedBlocks(64, 16, ctx.arch.kv_bytes_per_token)
    rep = Replica(env, CostModel(ctx.arch, ctx.hw), space, ServerConfig(preemption="swap", reuse_kv=True), 2**40)
    s = Seq(Request(0, 0.0, 40, 100), cached=40, state="running")
    rep.seqs[0] = s
    space.grow(0, 40)  # blocks 0, 1, 2 (the last one holds 8 tokens)
    block, calls_per_run = space.block_bytes, 2 * ctx.arch.layers
    assert rep.swap_out(s) and s.state == "swapped" and s.host == 40
    assert rep.n.swap_bytes == 3 * block and rep.n.copy_calls == calls_per_run  # one contiguous run
    assert rep.swap_in(s) and s.state == "running"
    s.cached = 70
    space.grow(0, 70)  # 5 blocks now
    before = rep.n.swap_bytes
    assert rep.swap_out(s)
    assert rep.n.swap_bytes - before == 3 * block  # blocks 2-4: block 2 was partial at the first swap-out
    assert rep.stall > 0  # synchronous here: the iteration pays for the copies
    outs = 2 * rep.cost.copy_s(3 * block, calls_per_run)  # two swap-outs of 3 blocks in one run each
    assert rep.stall == rep.cost.copy_s(3 * block, calls_per_run) * 2 + rep.cost.copy_s(3 * block, calls_per_run)
    assert rep.stall > outs  # + the swap-in of the 3 blocks between them


def test_fastswitch_tail_latency_below_vllm_under_preemption_pressure() -> None:
    cfg, ctx = ctx_for("system=fastswitch", "workload.n_requests=40", "workload.arrival.rate=4", "server.kv_gb=1.5")
    reqs = build_requests(cfg.workload, 0)
    system = FastSwitch()
    fs = system.simulate(copy.deepcopy(reqs), ctx).metrics
    base = system.baselines()["vllm"].simulate(copy.deepcopy(reqs), ctx).metrics
    assert base["preemptions"] > 100 and base["swap_stall_s"] > 0, "the setting must preempt"
    assert fs["swap_stall_s"] == 0 and fs["copy_busy_s"] > 0  # copies overlap compute
    assert fs["copy_calls"] < base["copy_calls"] / 4  # block groups
    assert fs["reused_tokens"] > 0  # later turns swap their history in
    assert fs["ttft_s_p99"] < base["ttft_s_p99"] and fs["ttft_s_p95"] < base["ttft_s_p95"]
    assert fs["tbt_s_p99.9"] < base["tbt_s_p99.9"] / 2

"""kvbench.serve event core: conservation of requests and tokens, no negative memory, deterministic traces,
the operator cost model and the allocators on hand-made cases, and the CLI's run directory."""

from __future__ import annotations

import copy
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from test_serve_helpers import ctx_for, serve_cfg

from kvbench.errors import UsageError
from kvbench.serve.cost import Batch, CostModel, causal_pairs
from kvbench.serve.memory import BlockGroups, PagedBlocks, VirtualPages, contiguous_runs
from kvbench.serve.run import run
from kvbench.serve.vllm import VLLM
from kvbench.serve.workload import all_turns, build_requests

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("workload.n_requests=60", "workload.arrival.rate=30")


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
@pytest.mark.parametrize("workload", ["sharegpt", "multiturn"])
def test_requests_and_tokens_are_conserved_under_memory_pressure(preemption: str, workload: str) -> None:
    n = 60 if workload == "sharegpt" else 15  # conversations of ~4 turns
    cfg, ctx = ctx_for(f"workload={workload}", f"workload.n_requests={n}", "workload.arrival.rate=30",
                       "server.kv_gb=0.5", f"server.preemption={preemption}")
    reqs = build_requests(cfg.workload, 0)
    res = VLLM().simulate(copy.deepcopy(reqs), ctx)  # check_conservation raises on a lost request or token
    m = res.metrics
    assert m["n_requests"] + m["rejected"] == len(all_turns(reqs))
    assert m["n_requests"] > 0.8 * len(all_turns(reqs))
    ids = {r["id"] for r in res.requests}
    assert m["output_tokens"] == sum(r.output for r in all_turns(reqs) if r.id in ids)
    assert m["preemptions"] > 0, "0.5 GiB of KV must force preemptions"
    assert (m["swap_out"] > 0) == (preemption == "swap")
    assert m["min_free_kv_bytes"] >= 0 and m["peak_kv_bytes"] <= m["kv_capacity_bytes"]
    assert all(row[4] >= 0 for row in res.iterations)


def test_the_trace_is_deterministic_for_a_seed() -> None:
    cfg, ctx = ctx_for(*SMALL, "server.kv_gb=0.5", "server.preemption=swap")
    a = VLLM().simulate(build_requests(cfg.workload, 0), ctx)
    b = VLLM().simulate(build_requests(cfg.workload, 0), ctx)
    c = VLLM().simulate(build_requests(cfg.workload, 1), ctx)
    assert a.digest == b.digest and a.metrics == b.metrics
    assert a.digest != c.digest


def test_cost_model_matches_a_hand_computed_iteration() -> None:
    _, ctx = ctx_for("hardware=a100-80gb", "arch=llama-3-8b")
    a, hw = ctx.arch, ctx.hw
    cost = CostModel(a, hw, kernel_factor=1.5)
    assert causal_pairs(3, 2) == 3 * 2 + 6  # tokens 1..3 see 2 cached + themselves: 3 + 4 + 5
    batch = Batch(prefill=[(100, 0)], decode=[1000, 2000])
    gemm = max(a.weight_bytes / hw.weight_bw, 102 * 2 * a.active_params_per_token / hw.gemm_flops)
    attn_p = 4 * 32 * 32 * 128 * (100 * 101 / 2) / hw.attn_flops
    attn_d = 3000 * a.kv_bytes_per_token / hw.attn_bw * 1.5
    want = hw.fixed_s + 3 * hw.per_seq_s + gemm + attn_p + attn_d
    assert cost.iteration_s(batch) == pytest.approx(want, rel=1e-12)
    assert a.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB per token for Llama-3-8B
    assert abs(a.weight_bytes / 2 - 8.03e9) < 0.05e9  # ~8.0 B parameters
    assert cost.copy_s(1e9, 100) == pytest.approx(100 * hw.copy_call_s + 1e9 / hw.pcie_bw)


def test_paged_blocks_count_runs_and_never_go_negative() -> None:
    assert contiguous_runs([0, 1, 2, 5, 6, 9]) == 3
    space = PagedBlocks(8, 16, 10)
    assert space.grow(1, 20) and space.blocks(1) == [0, 1]
    assert space.grow(2, 16) and space.grow(1, 33)  # seq 1 grows after seq 2: its blocks interleave
    assert space.blocks(1) == [0, 1, 3] and space.runs(1) == 2 and space.runs(1, from_token=32) == 1
    assert not space.grow(3, 16 * 6) and space.blocks(3) == []  # does not fit: nothing taken
    rng = random.Random(0)
    for space in (PagedBlocks(50, 16, 10), BlockGroups(50, 16, 10, group_blocks=4),
                  VirtualPages(50 * 160, 40, 1, 2)):
        live: dict[int, int] = {}
        for step in range(2000):
            sid = rng.randrange(12)
            if sid in live and rng.random() < 0.3:
                space.release(sid)
                live.pop(sid)
            else:
                tokens = live.get(sid, 0) + rng.randrange(1, 40)
                if space.grow(sid, tokens):
                    live[sid] = tokens
            assert 0 <= space.used <= space.capacity, (type(space).__name__, step)
        for sid in list(live):
            space.release(sid)
        assert space.used == 0


def test_block_groups_need_fewer_copy_calls_than_interleaved_blocks() -> None:
    """Two sequences growing in turn, one block at a time: paged blocks interleave (one run per block),
    block groups of 4 give one run per group."""
    paged, groups = PagedBlocks(64, 16, 10), BlockGroups(64, 16, 10, group_blocks=4)
    for space in (paged, groups):
        for tokens in range(16, 16 * 8 + 1, 16):
            for sid in (1, 2):
                assert space.grow(sid, tokens)
    assert paged.runs(1) == 8 and paged.runs(2) == 8
    assert groups.runs(1) == 2 and groups.runs(2) == 2
    assert groups.blocks(1) == [0, 1, 2, 3, 8, 9, 10, 11]
    groups.release(1)
    assert groups.extents[0] == [0, 4] and groups.grow(3, 16 * 4) and groups.runs(3) == 1


def test_workloads_are_deterministic_and_follow_their_specs() -> None:
    cfg = serve_cfg("workload=sharegpt", "workload.n_requests=4000")
    a, b = build_requests(cfg.workload, 0), build_requests(cfg.workload, 0)
    assert [(r.arrival, r.prompt, r.output) for r in a] == [(r.arrival, r.prompt, r.output) for r in b]
    n = len(a)
    assert abs(sum(r.prompt for r in a) / n - 161) < 10 and abs(sum(r.output for r in a) / n - 338) < 20
    assert abs(n / a[-1].arrival - 8.0) < 0.5  # Poisson rate
    conv = build_requests(serve_cfg("workload=multiturn").workload, 0)
    for first in conv:
        turns, r = [], first
        while r is not None:
            turns.append(r)
            r = r.next
        for prev, nxt in zip(turns, turns[1:], strict=False):
            assert nxt.history == prev.prompt + prev.output and nxt.prompt > nxt.history
    with pytest.raises(UsageError, match="rate"):
        build_requests(serve_cfg("workload.arrival.rate=0").workload, 0)


def test_trace_replay(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,100,5\n0.5,200,3\n")
    cfg, ctx = ctx_for("workload=trace", f"workload.arrival.path={trace}")
    res = VLLM().simulate(build_requests(cfg.workload, 0), ctx)
    assert [r["prompt"] for r in res.requests] == [100, 200] and res.metrics["output_tokens"] == 8


def test_run_writes_a_deterministic_run_directory(tmp_path: Path) -> None:
    cfg = serve_cfg(*SMALL, f"paths.results={tmp_path}")
    m = run(cfg)
    out = tmp_path / "serve/vllm/sharegpt/a100-80gb/llama-3-8b/kv=full/slo=ttft2-tpot0.1/seed=0"
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    for name in ("config.yaml", "requests.csv", "iterations.csv", "latency.png", "memory.png"):
        assert (out / name).exists(), name
    assert run(cfg) == json.loads((out / "metrics.json").read_text())  # finished: returned as is
    with pytest.raises(UsageError, match="different configuration"):
        run(serve_cfg(*SMALL, "server.max_seqs=8", f"paths.results={tmp_path}"))
    (out / "requests.csv").unlink()
    again = run(serve_cfg(*SMALL, f"paths.results={tmp_path}", "overwrite=true"))  # simulated again
    assert again["trace_digest"] == m["trace_digest"] and (out / "requests.csv").exists()
    (out / "metrics.json").unlink()  # a run killed before its last write: resumed by simulating it again
    assert run(cfg)["trace_digest"] == m["trace_digest"] and (out / "metrics.json").exists()
    assert m["metrics"]["server"]["block_tokens"] == 16  # the replica's effective settings are recorded
    from kvbench.serve.report import main as report

    report([str(tmp_path)])
    table = (tmp_path / "report" / "serve.md").read_text()
    assert "| vllm" in table and "sharegpt" in table and "ttft2-tpot0.1" in table


def test_cli_runs_and_rejects_bad_input(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "kvbench.serve", f"paths.results={tmp_path}", f"paths.logs={tmp_path}/logs"]
    ok = subprocess.run([*cmd[:3], "-m", *cmd[3:], "system=vllm,fastswitch", "workload.n_requests=10", "figures=false"],
                        capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert ok.returncode == 0, ok.stderr
    assert "vllm | sharegpt | a100-80gb" in ok.stdout and "fastswitch | multiturn | a10-24gb" in ok.stdout
    assert len(list((tmp_path / "serve").rglob("metrics.json"))) == 2  # one run directory per job
    bad = subprocess.run([*cmd, "system=nope"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "unknown system 'nope'; available:" in bad.stderr
    bad = subprocess.run([*cmd, "server.preemption=kill"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "server.preemption='kill'" in bad.stderr


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / "serve" / group).glob("*.yaml"))


@pytest.mark.parametrize("name", options("system"))
def test_every_system_option_instantiates_with_its_name(name: str) -> None:
    from hydra.utils import instantiate

    from kvbench.serve.system import System

    system = instantiate(serve_cfg(f"system={name}").system)
    assert isinstance(system, System) and system.name == name
    assert type(system).__doc__ and all(isinstance(b, System) for b in system.baselines().values())


@pytest.mark.parametrize("name", [n for n in options("workload") if n != "trace"])  # trace needs a file
def test_every_workload_option_builds_requests(name: str) -> None:
    cfg = serve_cfg(f"workload={name}")
    reqs = build_requests(cfg.workload, 0, 640)
    assert reqs and cfg.workload.name == name and all(r.prompt > 0 and r.output > 0 for r in reqs)


@pytest.mark.parametrize("name", [n for n in options("hardware") if n != "cpu"])  # cpu: test_serve_calibration
def test_every_gpu_profile_and_arch_builds(name: str) -> None:
    for arch in options("arch"):
        cfg, ctx = ctx_for(f"hardware={name}", f"arch={arch}")
        assert ctx.hw.name == name and ctx.arch.name == arch and ctx.hw.gemm_flops > 1e12

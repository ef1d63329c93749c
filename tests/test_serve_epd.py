"""EPD: the allocator's pool sizes on a hand-solved case, intra-request parallel encoding and the multimodal
cache on hand-made requests, the scaled SLO on a hand-computed case, lower encoder-pool memory, SLO attainment
above aggregated at high image counts at several SLO scales, and role switching after a workload change."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_serve_helpers import ctx_for, serve_cfg

from kvbench.errors import UsageError
from kvbench.serve.cost import Batch, CostModel
from kvbench.serve.epd import EPD, allocate, encode_s
from kvbench.serve.metrics import request_rows
from kvbench.serve.run import run
from kvbench.serve.slo import SCALE_GRID, resolve
from kvbench.serve.workload import Request, build_requests

SCALES = (1.5, 2.0, 3.0)


def test_allocator_balances_pool_demands() -> None:
    # demand (device seconds per request) E 3, P 1, D 2 on 6 GPUs: (3, 1, 2) gives utilisation 1 everywhere;
    # every other split has a pool above 1 (e.g. (2, 1, 3): E at 1.5)
    assert allocate({"E": 3.0, "P": 1.0, "D": 2.0}, 6) == {"E": 3, "P": 1, "D": 2}
    assert allocate({"E": 6.0, "P": 1.0, "D": 1.0}, 8) == {"E": 6, "P": 1, "D": 1}  # the repo's [6, 1, 1]
    with pytest.raises(UsageError):
        allocate({"E": 1.0, "P": 1.0, "D": 1.0}, 2)


def one_request(images: tuple[int, ...]) -> list[Request]:
    return [Request(0, 0.0, 64 + len(images) * 640, 10, images=images)]


def test_intra_request_parallelism_and_the_mm_cache() -> None:
    _, ctx = ctx_for("system=epd")
    six = one_request(tuple(range(6)))
    par = EPD(pools=[6, 1, 1]).simulate(six, ctx).requests[0]["ttft"]
    seq = EPD(pools=[6, 1, 1], intra_request=False).simulate(six, ctx).requests[0]["ttft"]
    assert seq - par == pytest.approx(encode_s(ctx, 6) - encode_s(ctx, 1), rel=1e-9)  # 6 images on 6 GPUs at once
    reqs = one_request((0, 1)) + [Request(1, 5.0, 64 + 2 * 640, 10, images=(0, 1))]  # the same two images again
    hit = EPD(gpus=4, pools=[2, 1, 1]).simulate(reqs, ctx)
    miss = EPD(gpus=4, pools=[2, 1, 1], mm_cache=False).simulate(reqs, ctx)
    assert hit.metrics["mm_cache_hits"] == 2 and miss.metrics["mm_cache_hits"] == 0
    assert miss.requests[1]["ttft"] - hit.requests[1]["ttft"] == pytest.approx(encode_s(ctx, 1), rel=1e-9)


def test_the_scaled_slo_is_the_aggregated_servers_unloaded_latency_times_the_scale() -> None:
    """Aggregated, one request alone: TTFT = encoding its 16 images on its GPU + the prefill iteration; TPOT = the
    mean of the 9 decode iterations after it (reading the KV of prompt + 0 .. 8 tokens)."""
    cfg, ctx = ctx_for("system=epd", "slo.scale=1.5")
    assert ctx.slo is None and ctx.slo_rule.scale == 1.5
    reqs = [Request(i, 0.1 * i, p + 16 * 640, 10, images=tuple(range(16 * i, 16 * i + 16)))
            for i, p in enumerate((40, 64, 90))]  # the median prompt: 64 text + 10240 image tokens
    resolve(EPD(), reqs, ctx)
    cost, prompt = CostModel(ctx.arch, ctx.hw, ctx.hw.paged_attn_factor), 64 + 16 * 640
    ttft = encode_s(ctx, 16) + cost.iteration_s(Batch(prefill=[(prompt, 0)]))
    tpot = sum(cost.iteration_s(Batch(decode=[prompt + k])) for k in range(9)) / 9
    assert ctx.slo.reference == "aggregated" and ctx.slo.request == {"prompt": prompt, "output": 10, "images": 16}
    assert ctx.slo.unloaded["ttft_s"] == pytest.approx(ttft, rel=1e-9)
    assert ctx.slo.unloaded["tpot_s"] == pytest.approx(tpot, rel=1e-9)
    assert (ctx.slo.ttft_s, ctx.slo.tpot_s) == pytest.approx((1.5 * ttft, 1.5 * tpot), rel=1e-12)
    assert ctx.slo.at(3.0).ttft_s == pytest.approx(3 * ttft)
    with pytest.raises(UsageError, match="slo.reference='nope'"):
        resolve(EPD(), reqs, ctx_for("system=epd", "slo.reference=nope")[1])
    with pytest.raises(UsageError, match="scale"):
        ctx_for("system=epd", "+slo.ttft_s=1.5")  # bounds in seconds and a scale: one or the other


def test_epd_attains_more_slos_than_aggregated_serving_at_high_image_counts_at_every_scale() -> None:
    """16 images per request at 4 req/s, the same absolute SLO for all systems at SLO scales 1.5, 2 and 3; at
    0.5 req/s every system meets every SLO (the bounds are above the unloaded latency, not below it)."""
    cfg, ctx = ctx_for("system=epd", "workload.arrival.rate=4")
    reqs = build_requests(cfg.workload, 0, ctx.arch.tokens_per_image)
    epd = EPD()
    resolve(epd, reqs, ctx)
    ours = epd.simulate(reqs, ctx)
    agg = epd.baselines()["aggregated"].simulate(reqs, ctx)
    for s in SCALES:
        mine, theirs = ctx.slo.at(s).attainment(ours.requests), ctx.slo.at(s).attainment(agg.requests)
        assert mine > theirs + 0.1 and theirs > 0.3, (s, mine, theirs)
    light = epd.at_rate(0.5, ctx)
    assert all(ctx.slo.at(s).attainment(rows) == 1.0 for s in SCALES for rows in light.values())
    assert ours.metrics["peak_mem_bytes"]["E"] * 5 < agg.metrics["peak_mem_bytes"]["A"]  # no LLM weights or KV
    assert sum(ours.metrics["pools"].values()) == 8


def test_role_switching_moves_idle_encoders_to_prefill_after_a_workload_change() -> None:
    cfg, ctx = ctx_for("system=epd", "workload=multimodal_shift", "workload.n_requests=240")
    reqs = build_requests(cfg.workload, 0, ctx.arch.tokens_per_image)
    assert len(reqs[0].images) == 16 and len(reqs[-1].images) == 0 and reqs[-1].prompt >= 10000
    epd = EPD(role_switch=True, initial_window_s=20.0)
    resolve(epd, reqs, ctx)
    ours, static = epd.simulate(reqs, ctx), epd.baselines()["epd_static"].simulate(reqs, ctx)
    m, st = ours.metrics, static.metrics
    assert m["pools"] == st["pools"] == st["pools_at_end"]  # the same start, sized for images
    assert m["role_switches"] > 0
    assert m["pools_at_end"]["E"] < m["pools"]["E"] and m["pools_at_end"]["P"] > m["pools"]["P"]
    assert m["ttft_s_p99"] < 0.95 * st["ttft_s_p99"]
    gain = [ctx.slo.at(s).attainment(ours.requests) - ctx.slo.at(s).attainment(static.requests) for s in SCALE_GRID]
    assert min(gain) >= 0 and max(gain) > 0, gain  # never worse at any SLO scale, better at the tight ones


def test_slo_vs_rate_and_scale_are_reported(tmp_path: Path) -> None:
    m = run(serve_cfg("system=epd", "workload.n_requests=30", "system.rates=[0.5,4]", f"paths.results={tmp_path}"))
    x = m["metrics"]
    assert set(x["slo_vs_rate"]) == {"0.5", "4"} and set(x["slo_vs_rate_by_scale"]) == {"1.5", "2", "3"}
    assert x["slo_vs_rate"]["4"] == x["slo_vs_rate_by_scale"]["2"]["4"]  # the default scale is 2
    assert m["slo"]["reference"] == "aggregated" and set(m["slo_vs_scale"]["2"]) == {"epd", "aggregated", "pd"}
    assert m["slo_vs_scale"]["2"]["epd"] == x["slo_attainment"]
    assert all((tmp_path / "serve/epd/multimodal/a100-80gb/minicpm-v-2.6/kv=full/slo=x2/seed=0" / f).exists()
                        for f in ("slo_vs_rate.png", "slo_vs_scale.png"))


def test_the_searching_allocator_picks_the_split_with_the_best_slo_attainment() -> None:
    """allocator=search simulates every (E, P, D) split of 5 GPUs on another draw of the workload (seed 1) and
    keeps the best attainment: no split does better on that draw, and it is at least the balanced split's."""
    cfg, ctx = ctx_for("system=epd", "workload.n_requests=40", "workload.arrival.rate=2", "slo.scale=1.5")
    reqs = build_requests(cfg.workload, 0, ctx.arch.tokens_per_image)
    epd = EPD(gpus=5, allocator="search")
    resolve(epd, reqs, ctx)
    chosen = epd.sizes(reqs, ctx)
    trial = build_requests(cfg.workload, 1, ctx.arch.tokens_per_image)
    att = {tuple(s.values()): ctx.slo.attainment(request_rows(EPD(gpus=5).run_once(trial, ctx, s)[1]))
           for s in epd.splits()}
    assert len(att) == 6 and att[tuple(chosen.values())] == max(att.values())
    balanced = EPD(gpus=5).sizes(reqs, ctx)
    assert att[tuple(chosen.values())] >= att[tuple(balanced.values())]
    assert max(att.values()) > min(att.values())  # the choice matters on this workload
    with pytest.raises(UsageError, match="allocator=search"):
        EPD(allocator="search").sizes(reqs, ctx_for("system=epd")[1])  # no SLO resolved yet
    with pytest.raises(UsageError, match="balance or search"):
        EPD(allocator="simulate").sizes(reqs, ctx)

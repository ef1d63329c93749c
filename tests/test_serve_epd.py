"""EPD: the allocator's pool sizes on a hand-solved case, intra-request parallel encoding and the multimodal
cache on hand-made requests, lower encoder-pool memory, and SLO attainment above aggregated at high image counts."""

from __future__ import annotations

import pytest
from test_serve_helpers import ctx_for

from kvbench.errors import UsageError
from kvbench.serve.epd import EPD, allocate, encode_s
from kvbench.serve.workload import Request, build_requests


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


def test_epd_meets_slos_where_aggregated_serving_does_not_at_high_image_counts() -> None:
    cfg, ctx = ctx_for("system=epd", "workload.n_requests=60")  # 16 images per request, 3 req/s, TTFT SLO 1.5 s
    reqs = build_requests(cfg.workload, 0, ctx.arch.tokens_per_image)
    epd = EPD()
    ours = epd.simulate(reqs, ctx).metrics
    agg = epd.baselines()["aggregated"].simulate(reqs, ctx).metrics
    assert ours["slo_attainment"] > agg["slo_attainment"] + 0.2, (ours["slo_attainment"], agg["slo_attainment"])
    assert ours["peak_mem_bytes"]["E"] * 5 < agg["peak_mem_bytes"]["A"]  # encoders hold no LLM weights or KV
    assert sum(ours["pools"].values()) == 8


def test_role_switching_moves_idle_encoders_to_prefill_after_a_workload_change() -> None:
    cfg, ctx = ctx_for("system=epd", "workload=multimodal_shift", "workload.n_requests=240")
    reqs = build_requests(cfg.workload, 0, ctx.arch.tokens_per_image)
    assert len(reqs[0].images) == 16 and len(reqs[-1].images) == 0 and reqs[-1].prompt >= 10000
    epd = EPD(role_switch=True, initial_window_s=20.0)
    ours = epd.simulate(reqs, ctx).metrics
    static = epd.baselines()["epd_static"].simulate(reqs, ctx).metrics
    assert ours["pools"] == static["pools"] == static["pools_at_end"]  # the same start, sized for images
    assert ours["role_switches"] > 0
    assert ours["pools_at_end"]["E"] < ours["pools"]["E"] and ours["pools_at_end"]["P"] > ours["pools"]["P"]
    assert ours["slo_attainment"] > static["slo_attainment"] and ours["ttft_s_p99"] < static["ttft_s_p99"]

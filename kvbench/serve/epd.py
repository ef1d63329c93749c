"""EPD disaggregation (Singh et al., ICML'25; vbdi/epdserve): encode, prefill and decode on separate GPU pools.

* Encode pool: ``E`` GPUs run the vision encoder; one request's images are split across idle encoders
  (intra-request parallelism) and a multimodal-token cache skips images already encoded (a repeated image id);
  the image tokens then move to a prefill GPU (``tokens_per_image * hidden`` values over NVLink).
* Prefill pool: ``P`` vLLM-like replicas that stop after the first token and send the KV to a decode GPU
  (``prompt * kv_bytes_per_token`` over NVLink);
* Decode pool: ``D`` replicas that continue from the second token (continuous batching).

``pools: null`` lets the resource allocator choose ``(E, P, D)`` for ``gpus`` GPUs, every pool at least one GPU.
``allocator: balance`` (default): the split with the lowest bottleneck utilisation ``max_i demand_i / n_i`` (each
pool's device seconds per request, estimated from the cost model on the workload's mean request), an analytic
stand-in for the paper's simulator search; ``allocator: search``: that search (:meth:`EPD.search`), every split
simulated on another draw of the workload, the best SLO attainment kept. Role switching (``role_switch``): every
``monitor_s`` the allocator re-runs on the last window's requests and one GPU drains, spends ``switch_s`` and joins
the pool below its target.

Baselines on the same GPUs: ``aggregated`` (every GPU a vLLM-like replica that encodes its requests' images inside
the prefill iteration) and ``pd`` (DistServe-style prefill/decode disaggregation, encoding on the prefill GPUs).
Peak memory per pool is weights (encoder and/or LLM) + encoder activations of the images in flight
(``encoder_act_bytes`` each, our estimate) + the peak KV.

SLO attainment (also against request rate, ``rates``) uses the run's SLO; ``system=epd`` defaults to ``slo=scaled``
(:mod:`kvbench.serve.slo`): 2 x the aggregated server's unloaded TTFT and TPOT on the median request, the same
bounds for EPD and both baselines, and the curves are also reported at each of ``slo.scales``.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import simpy

from kvbench.errors import UsageError
from kvbench.serve.core import Replica, Seq
from kvbench.serve.cost import Batch, CostModel
from kvbench.serve.memory import PagedBlocks
from kvbench.serve.metrics import request_rows, summarize
from kvbench.serve.system import SimContext, SimResult, System, check_conservation
from kvbench.serve.workload import Request, build_requests


def allocate(demand: dict[str, float], gpus: int) -> dict[str, int]:
    """Pool sizes (each >= 1, summing to ``gpus``) minimising the largest ``demand / size``; ties: fewer GPUs on
    earlier pools."""
    names = list(demand)
    if gpus < len(names):
        raise UsageError(f"{len(names)} pools need at least {len(names)} GPUs, got {gpus}")
    best = min((c for c in itertools.product(range(1, gpus + 1), repeat=len(names)) if sum(c) == gpus),
               key=lambda c: (max(demand[n] / k for n, k in zip(names, c, strict=True)), c))
    return dict(zip(names, best, strict=True))


def encode_s(ctx: SimContext, images: int) -> float:
    a, hw = ctx.arch, ctx.hw
    if images == 0:
        return 0.0
    flops = images * 2 * a.encoder_params * a.patches_per_image
    return hw.fixed_s + max(a.encoder_params * a.dtype_bytes / hw.weight_bw, flops / hw.gemm_flops)


class EncodingReplica(Replica):
    """Aggregated / PD: the replica encodes the images of the requests it prefills, inside that iteration."""

    def __init__(self, *args: Any, ctx: SimContext, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ctx, self.encoded, self.images_peak = ctx, set(), 0

    def plan(self) -> tuple[Batch, list[Seq]]:
        batch, members = super().plan()
        todo = [s for s in members if s.pending and s.sid not in self.encoded]
        images = sum(len(s.req.images) for s in todo)
        self.encoded.update(s.sid for s in todo)
        self.images_peak = max(self.images_peak, images)
        self.extra_s += encode_s(self.ctx, images)
        return batch, members


@dataclass
class Cluster:
    """The instances of one simulation and their bookkeeping."""

    env: simpy.Environment
    prefill: list[Replica]
    decode: list[Replica]
    encoders: simpy.Store | None = None  # one item per idle encoder GPU
    n_enc: int = 0
    retired: list[Replica] = field(default_factory=list)  # instances that switched roles (their work counts)
    switches: int = 0
    cache: set[int] = field(default_factory=set)
    images_in_flight: int = 0
    images_peak: int = 0
    cache_hits: int = 0
    images_seen: int = 0


def least_loaded(reps: list[Replica]) -> Replica:
    return min(reps, key=lambda r: (len(r.seqs), id(r)))


@dataclass
class EPD(System):
    name: str = "epd"
    headline: ClassVar[tuple[str, ...]] = ("slo_attainment", "ttft_s_p99", "tpot_s_mean")
    gpus: int = 8
    pools: list[int] | None = None  # [E, P, D]; null: the allocator decides
    mm_cache: bool = True
    intra_request: bool = True
    encoder_act_bytes: float = 1.0e8  # activations held per image while it is encoded (our estimate)
    rates: list[float] = field(default_factory=list)  # also report SLO attainment at these request rates
    mode: str = "epd"  # epd | aggregated | pd
    role_switch: bool = False  # re-allocate pools at run time (EPD only)
    monitor_s: float = 10.0  # role switching: allocator period and window
    switch_s: float = 5.0  # role switching: time for a GPU to change role (reload weights; our estimate)
    initial_window_s: float | None = None  # pools: null -> size from the requests of this first window only
    allocator: str = "balance"  # balance (demands, analytically) | search (simulate every split, best SLO attainment)

    # -- demands and pools --------------------------------------------------------------------------------------
    def demands(self, requests: list[Request], ctx: SimContext) -> dict[str, float]:
        cost = CostModel(ctx.arch, ctx.hw, ctx.hw.paged_attn_factor)
        n = len(requests)
        prompt = sum(r.prompt for r in requests) / n
        out = sum(r.output for r in requests) / n
        images = sum(len(r.images) for r in requests) / n
        batch = 32
        d = {"E": images * (encode_s(ctx, 1) - ctx.hw.fixed_s) + ctx.hw.fixed_s,
             "P": cost.iteration_s(Batch(prefill=[(int(prompt), 0)])),
             "D": max(out - 1, 0) * cost.iteration_s(Batch(decode=[int(prompt + out / 2)] * batch)) / batch}
        if self.mode == "pd":
            return {"P": d["E"] + d["P"], "D": d["D"]}
        return d

    def sizes(self, requests: list[Request], ctx: SimContext) -> dict[str, int]:
        if self.mode == "aggregated":
            return {"A": self.gpus}
        if self.initial_window_s is not None and self.mode == "epd" and self.pools is None:
            first = [r for r in requests if r.arrival <= requests[0].arrival + self.initial_window_s] or requests[:1]
            return allocate(self.demands(first, ctx), self.gpus)  # what is known when the server starts
        if self.pools is not None and self.mode == "epd":
            if len(self.pools) != 3 or sum(self.pools) != self.gpus or min(self.pools) < 1:
                raise UsageError(f"system.pools={self.pools}: three pool sizes >= 1 summing to gpus={self.gpus}")
            return dict(zip("EPD", self.pools, strict=True))
        if self.allocator == "search":
            return self.search(ctx)
        if self.allocator != "balance":
            raise UsageError(f"system.allocator={self.allocator!r}; choose balance or search")
        return allocate(self.demands(requests, ctx), self.gpus)

    def splits(self) -> list[dict[str, int]]:
        names = "EPD" if self.mode == "epd" else "PD"
        return [dict(zip(names, c, strict=True)) for c in itertools.product(range(1, self.gpus + 1), repeat=len(names))
                if sum(c) == self.gpus]

    def search(self, ctx: SimContext) -> dict[str, int]:
        """The split with the highest SLO attainment (ties: lower P99 TTFT) when every split serves another draw of
        the workload (seed + 1: the same distribution and rate, not the requests it will serve), as the paper's
        simulation-driven allocator does (its simulator is DistServe's; ours is this one)."""
        if ctx.slo is None:
            raise UsageError("system.allocator=search chooses pools for an SLO; this run has none")
        trial = build_requests(ctx.workload, ctx.seed + 1, ctx.arch.tokens_per_image)
        probe = replace(self, role_switch=False, rates=[])

        def score(sizes: dict[str, int]) -> tuple[float, float]:
            done = probe.run_once(copy.deepcopy(trial), ctx, sizes)[1]
            return -ctx.slo.attainment(request_rows(done)), summarize(done)["ttft_s_p99"]

        return min(self.splits(), key=score)

    # -- one simulation -----------------------------------------------------------------------------------------
    def replica(self, env: simpy.Environment, ctx: SimContext, encoder: bool, images: int = 0) -> Replica:
        a, hw = ctx.arch, ctx.hw
        weights = a.weight_bytes + (a.encoder_params * a.dtype_bytes if encoder else 0)
        kv = hw.mem_bytes * hw.mem_util - weights - (images * self.encoder_act_bytes if encoder else 0)
        if ctx.server.kv_gb is not None:
            kv = ctx.server.kv_gb * 2**30
        block = ctx.server.block_tokens * a.kv_bytes_per_token
        space = PagedBlocks(int(kv // block), ctx.server.block_tokens, a.kv_bytes_per_token)
        cost = CostModel(a, hw, hw.paged_attn_factor)
        server = replace(ctx.server, max_seqs=ctx.max_seqs())
        host = server.swap_gb * 2**30
        if encoder:
            return EncodingReplica(env, cost, space, server, host, ctx=ctx)
        return Replica(env, cost, space, server, host)

    def build(self, env: simpy.Environment, ctx: SimContext, sizes: dict[str, int], max_images: int) -> Cluster:
        if self.mode == "aggregated":
            return Cluster(env, [self.replica(env, ctx, True, max_images) for _ in range(sizes["A"])], [])
        enc = self.mode == "pd"
        cl = Cluster(env, [self.replica(env, ctx, enc, max_images) for _ in range(sizes["P"])],
                     [self.replica(env, ctx, False) for _ in range(sizes["D"])])
        if self.mode == "epd":
            cl.encoders = simpy.Store(env)
            cl.encoders.items.extend(range(sizes["E"]))
            cl.n_enc = sizes["E"]
        for p in cl.prefill:
            p.handoff = lambda s, cl=cl: env.process(self.move_kv(cl, ctx, s))
        return cl

    def move_kv(self, cl: Cluster, ctx: SimContext, s: Seq) -> Any:
        yield cl.env.timeout(ctx.hw.fixed_s + s.cached * ctx.arch.kv_bytes_per_token / ctx.hw.nvlink_bw)
        least_loaded(cl.decode).submit_prefilled(s)

    def encode_job(self, cl: Cluster, ctx: SimContext, images: int) -> Any:
        gpu = yield cl.encoders.get()
        cl.images_in_flight += images
        cl.images_peak = max(cl.images_peak, cl.images_in_flight)
        yield cl.env.timeout(encode_s(ctx, images))
        cl.images_in_flight -= images
        yield cl.encoders.put(gpu)

    def admit(self, cl: Cluster, ctx: SimContext, r: Request) -> Any:
        """EPD: encode (split across encoders, cached images skipped), move the image tokens, then prefill."""
        if cl.encoders is not None and r.images:
            todo = [i for i in r.images if not (self.mm_cache and i in cl.cache)]
            cl.images_seen += len(r.images)
            cl.cache_hits += len(r.images) - len(todo)
            parts = min(cl.n_enc, len(todo)) if self.intra_request else min(len(todo), 1)
            chunks = [todo[k::parts] for k in range(parts)] if parts else []
            yield simpy.AllOf(cl.env, [cl.env.process(self.encode_job(cl, ctx, len(c))) for c in chunks])
            cl.cache.update(todo)
            mm = len(r.images) * ctx.arch.tokens_per_image * ctx.arch.hidden * ctx.arch.dtype_bytes
            yield cl.env.timeout(mm / ctx.hw.nvlink_bw)
        least_loaded(cl.prefill).submit(r)

    def run_once(self, requests: list[Request], ctx: SimContext,
                 sizes: dict[str, int] | None = None) -> tuple[dict[str, Any], list[Seq], Cluster]:
        env = simpy.Environment()
        sizes = sizes or self.sizes(requests, ctx)
        cl = self.build(env, ctx, sizes, max(len(r.images) for r in requests))

        def arrivals() -> Any:
            for r in requests:
                yield env.timeout(max(r.arrival - env.now, 0.0))
                env.process(self.admit(cl, ctx, r))

        env.process(arrivals())
        if self.role_switch and self.mode == "epd":
            env.process(self.monitor(cl, ctx, requests))
        env.run()
        reps = cl.prefill + cl.decode + cl.retired
        done = [s for rep in reps for s in rep.done]
        check_conservation(requests, done, [q for rep in reps for q in rep.rejected])
        return sizes, done, cl

    def peak_memory(self, ctx: SimContext, cl: Cluster) -> dict[str, float]:
        a = ctx.arch
        enc_w, llm_w = a.encoder_params * a.dtype_bytes, a.weight_bytes
        if self.mode == "aggregated":
            img = max(r.images_peak for r in cl.prefill)
            return {"A": enc_w + llm_w + img * self.encoder_act_bytes + max(r.n.peak_kv_bytes for r in cl.prefill)}
        out = {"D": llm_w + max(r.n.peak_kv_bytes for r in cl.decode)}
        if self.mode == "pd":
            img = max(r.images_peak for r in cl.prefill)
            return {"P": enc_w + llm_w + img * self.encoder_act_bytes + max(r.n.peak_kv_bytes for r in cl.prefill),
                    **out}
        per_encoder = cl.images_peak / max(cl.n_enc, 1)
        return {"E": enc_w + per_encoder * self.encoder_act_bytes,
                "P": llm_w + max(r.n.peak_kv_bytes for r in cl.prefill), **out}

    def simulate(self, requests: list[Request], ctx: SimContext) -> SimResult:
        sizes, done, cl = self.run_once(copy.deepcopy(requests), ctx)
        m = summarize(done, ctx.slo) | {"pools": sizes, "pools_at_end": self.current(cl) if cl.encoders else sizes,
                                         "role_switches": cl.switches, "peak_mem_bytes": self.peak_memory(ctx, cl),
                                         "mm_cache_hits": cl.cache_hits, "images": cl.images_seen}
        if self.rates and ctx.slo:
            m |= self.rate_curves(ctx)
        return SimResult(m, request_rows(done))

    def at_rate(self, rate: float, ctx: SimContext) -> dict[str, list[dict[str, Any]]]:
        """The request rows of the system and its baselines on the workload at another request rate."""
        wl = copy.deepcopy(ctx.workload)
        wl.arrival.rate = rate
        at = replace(ctx, workload=wl)  # an allocator that searches sizes the pools for this rate
        reqs = build_requests(wl, ctx.seed, ctx.arch.tokens_per_image)
        systems = (self, *self.baselines().values())
        return {s.name: request_rows(s.run_once(copy.deepcopy(reqs), at)[1]) for s in systems}

    def rate_curves(self, ctx: SimContext) -> dict[str, Any]:
        """SLO attainment vs request rate (``slo_vs_rate``) and, for a scaled SLO, at each of ``slo.scales``."""
        rows = {f"{rate:g}": self.at_rate(rate, ctx) for rate in self.rates}
        slos = {f"{s:g}": ctx.slo.at(s) for s in (ctx.slo_rule.scales if ctx.slo_rule and ctx.slo.unloaded else ())}
        out: dict[str, Any] = {"slo_vs_rate": {r: {n: ctx.slo.attainment(x) for n, x in v.items()}
                                               for r, v in rows.items()}}
        if slos:
            out["slo_vs_rate_by_scale"] = {s: {r: {n: slo.attainment(x) for n, x in v.items()} for r, v in rows.items()}
                                           for s, slo in slos.items()}
        return out

    def baselines(self) -> dict[str, System]:
        if self.mode != "epd":
            return {}
        out: dict[str, System] = {"aggregated": replace(self, name="aggregated", mode="aggregated", rates=[]),
                                  "pd": replace(self, name="pd", mode="pd", rates=[])}
        if self.role_switch:
            out["epd_static"] = replace(self, name="epd_static", role_switch=False, rates=[])
        return out

    # -- role switching -----------------------------------------------------------------------------------------
    def current(self, cl: Cluster) -> dict[str, int]:
        return {"E": cl.n_enc, "P": len(cl.prefill), "D": len(cl.decode)}

    def monitor(self, cl: Cluster, ctx: SimContext, requests: list[Request]) -> Any:
        """Every ``monitor_s``: re-run the allocator on the requests of the last window and move one GPU from a
        pool above its target to one below (drain it, ``switch_s`` to reload, join the other pool)."""
        last = requests[-1].arrival
        while cl.env.now <= last:
            yield cl.env.timeout(self.monitor_s)
            window = [r for r in requests if cl.env.now - self.monitor_s < r.arrival <= cl.env.now]
            if not window:
                continue
            target, now = allocate(self.demands(window, ctx), self.gpus), self.current(cl)
            src = next((k for k in "EPD" if now[k] > target[k]), None)
            dst = next((k for k in "EPD" if now[k] < target[k]), None)
            if src and dst:
                yield from self.switch(cl, ctx, src, dst)

    def switch(self, cl: Cluster, ctx: SimContext, src: str, dst: str) -> Any:
        if src == "E":
            cl.n_enc -= 1
            yield cl.encoders.get()  # the next encoder to become idle leaves the pool
        else:
            pool = cl.prefill if src == "P" else cl.decode
            rep = pool.pop()  # no new work is routed to it; it finishes what it holds
            cl.retired.append(rep)
            while rep.seqs:
                yield cl.env.timeout(self.monitor_s / 10)
        yield cl.env.timeout(self.switch_s)
        cl.switches += 1
        if dst == "E":
            cl.n_enc += 1
            yield cl.encoders.put(object())
        elif dst == "P":
            rep = self.replica(cl.env, ctx, False)
            rep.handoff = lambda s: cl.env.process(self.move_kv(cl, ctx, s))
            cl.prefill.append(rep)
        else:
            cl.decode.append(self.replica(cl.env, ctx, False))

"""Service-level objectives: absolute (``ttft_s`` / ``tpot_s``), or an ``SLO scale`` of an unloaded latency.

A derived SLO multiplies a base latency by a ``scale``, as DistServe's (Zhong et al., OSDI'24) "SLO scale"
experiments do: the TTFT and TPOT bounds are ``scale`` x the latency of a *reference* system serving the workload's
median request alone (no queueing, no batching), and every system compared is held to the same absolute bounds.
The base is our choice (EPD's SLO values were not retrieved). EPDServe's own plots use fixed thresholds for its
hardware (``analyze.py``: TTFT < 1.4 s, TPOT < 0.04 s at 2 images per request); fixed numbers do not carry over to
modelled hardware and other image counts, where a bound just below or above every request's unloaded latency makes
attainment a step (0 or 1) instead of a measure of load. So ``system=epd`` uses a scale (``slo=scaled``).

* reference: the system's first baseline (EPD: ``aggregated``, the vLLM-like server; FastSwitch / vAttention:
  ``vllm``), or the system itself when it has none; ``slo.reference`` names another;
* request: the median of the workload's (first-turn) requests ordered by prompt, output and image count, arriving
  at t = 0 into an empty system; a one-token output has no TPOT, and then no TPOT bound.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from kvbench.errors import UsageError
from kvbench.serve.metrics import SLO, SLORule
from kvbench.serve.system import SimContext, SimResult, System
from kvbench.serve.workload import Request

# slo_vs_scale.png: 1.25 .. 5. Not 1.0: there only requests that met no other request pass, and a request shaped
# like the reference passes or fails on a floating-point tie.
SCALE_GRID = tuple(1.0 + 0.25 * k for k in range(1, 17))


def parse_slo(node: Any) -> tuple[SLO | None, SLORule | None]:
    """An absolute SLO or a rule from a config node (``{ttft_s, tpot_s}`` or ``{scale, reference, scales}``)."""
    if not node:
        return None, None
    d = dict(node)
    unknown = set(d) - {"ttft_s", "tpot_s", "scale", "reference", "scales"}
    if unknown:
        raise UsageError(f"slo: unknown keys {sorted(unknown)}; use ttft_s and tpot_s, or scale (and reference)")
    scale = d.get("scale")
    if scale is None:
        if d.get("ttft_s") is None and d.get("tpot_s") is None:
            raise UsageError("slo: give ttft_s / tpot_s (seconds) or scale (x the unloaded latency)")
        return SLO(d.get("ttft_s"), d.get("tpot_s")), None
    if d.get("ttft_s") is not None or d.get("tpot_s") is not None:
        raise UsageError(f"slo: scale={scale} derives ttft_s and tpot_s, so they cannot be given too; use "
                         "slo=scaled slo.scale=<x> or slo=absolute slo.ttft_s=<s> slo.tpot_s=<s>")
    scales = tuple(float(s) for s in d.get("scales") or ())
    if min((float(scale), *scales)) <= 0:
        raise UsageError(f"slo: scales must be > 0, got scale={scale}, scales={list(scales)}")
    return None, SLORule(float(scale), d.get("reference"), scales)


def slo_tag(node: Any) -> str:
    """The run directory's ``slo=`` part: ``ttft2-tpot0.1`` (absolute), ``x2`` or ``x2-pd`` (scaled, reference)."""
    slo, rule = parse_slo(node)
    if rule is not None:
        return f"x{rule.scale:g}" + (f"-{rule.reference}" if rule.reference else "")
    if slo is None:
        return "none"
    return "-".join(f"{k}{'none' if v is None else f'{v:g}'}" for k, v in (("ttft", slo.ttft_s), ("tpot", slo.tpot_s)))


def reference_request(requests: list[Request]) -> Request:
    """The median request by (prompt, output, images), alone: arriving at 0, with no later turns."""
    ranked = sorted(requests, key=lambda r: (r.prompt, r.output, len(r.images), r.id))
    med = ranked[(len(ranked) - 1) // 2]
    return replace(med, id=0, arrival=0.0, next=None, conv=-1, turn=0, history=0, think_s=0.0)


def reference_system(system: System, name: str | None) -> System:
    systems = {system.name: system, **system.baselines()}
    if name is None:
        return next(iter(system.baselines().values()), system)
    if name not in systems:
        raise UsageError(f"slo.reference={name!r}: choose one of {', '.join(systems)} (this run's systems)")
    return systems[name]


def unloaded(system: System, request: Request, ctx: SimContext) -> dict[str, float | None]:
    """TTFT and TPOT of ``request`` served alone by ``system``."""
    alone = replace(ctx, slo=None, slo_rule=None)
    row = system.simulate([copy.deepcopy(request)], alone).requests[0]
    return {"ttft_s": row["ttft"], "tpot_s": row["tpot"]}


def derive(rule: SLORule, system: System, requests: list[Request], ctx: SimContext) -> SLO:
    ref, req = reference_system(system, rule.reference), reference_request(requests)
    shape = {"prompt": req.prompt, "output": req.output, "images": len(req.images)}
    return SLO(None, None, reference=ref.name, unloaded=unloaded(ref, req, ctx), request=shape).at(rule.scale)


def resolve(system: System, requests: list[Request], ctx: SimContext) -> None:
    """Set ``ctx.slo`` from ``ctx.slo_rule`` (a derived SLO) before the systems run; absolute SLOs stay."""
    if ctx.slo_rule is not None:
        ctx.slo = derive(ctx.slo_rule, system, requests, ctx)


def attainment_vs_scale(runs: dict[str, SimResult], slo: SLO | None,
                        grid: tuple[float, ...] = SCALE_GRID) -> dict[str, dict[str, float | None]]:
    """``{scale: {system: SLO attainment}}`` from each run's request rows (a derived SLO only; else empty)."""
    if slo is None or slo.unloaded is None:
        return {}
    return {f"{s:g}": {n: slo.at(s).attainment(r.requests) for n, r in runs.items()} for s in grid}

"""Request-level serving metrics: TTFT, TBT, TPOT, end-to-end latency, throughput, SLO attainment."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99, 99.9)


@dataclass(frozen=True)
class SLO:
    """A request meets its SLO when ``ttft <= ttft_s`` and ``tpot <= tpot_s`` (``None``: no bound). A derived SLO
    (:mod:`kvbench.serve.slo`) also keeps how it was made: ``scale`` x the ``reference`` system's ``unloaded``
    latency on ``request`` (its prompt, output and image count)."""

    ttft_s: float | None
    tpot_s: float | None
    scale: float | None = None
    reference: str | None = None
    unloaded: dict[str, float | None] | None = None  # the reference's ttft_s / tpot_s on one request, alone
    request: dict[str, int] | None = None

    def at(self, scale: float) -> SLO:
        """The same rule at another scale (a derived SLO only)."""
        u = self.unloaded
        if u is None:
            raise ValueError("an absolute SLO has no scale")
        return replace(self, scale=scale, ttft_s=scale * u["ttft_s"],
                       tpot_s=scale * u["tpot_s"] if u["tpot_s"] is not None else None)

    def met(self, row: dict[str, Any]) -> bool:
        return ((self.ttft_s is None or row["ttft"] <= self.ttft_s)
                and (self.tpot_s is None or (row["tpot"] or 0.0) <= self.tpot_s))

    def attainment(self, rows: list[dict[str, Any]]) -> float | None:
        """Share of ``rows`` (:func:`request_rows`) that meet the SLO."""
        return float(np.mean([self.met(r) for r in rows])) if rows else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SLORule:
    """A derived SLO: ``scale`` x the ``reference`` system's unloaded TTFT / TPOT; ``scales``: the scales at which
    figures and the directional checks also report attainment."""

    scale: float
    reference: str | None = None
    scales: tuple[float, ...] = ()


def pct(values: list[float] | np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def distribution(values: list[float] | np.ndarray, name: str) -> dict[str, float | None]:
    vals = np.asarray(values, dtype=float)
    out: dict[str, float | None] = {f"{name}_mean": float(vals.mean()) if len(vals) else None}
    out.update({f"{name}_p{q:g}": pct(vals, q) for q in PERCENTILES})
    return out


def request_rows(seqs: list[Any]) -> list[dict[str, Any]]:
    """One row per finished request (a :class:`kvbench.serve.core.Seq` or anything with the same fields)."""
    rows = []
    for s in sorted(seqs, key=lambda s: s.req.id):
        t = s.token_times
        rows.append({"id": s.req.id, "conv": s.req.conv, "turn": s.req.turn, "arrival": s.req.arrival,
                     "prompt": s.req.prompt, "output": s.req.output, "images": len(s.req.images),
                     "first_token": s.first_token, "finish": t[-1], "ttft": s.first_token - s.req.arrival,
                     "tpot": (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None, "e2e": t[-1] - s.req.arrival,
                     "preemptions": s.preemptions})
    return rows


def summarize(seqs: list[Any], slo: SLO | None = None) -> dict[str, Any]:
    rows = request_rows(seqs)
    if not rows:
        return {"n_requests": 0}
    tbt = np.concatenate([np.diff(s.token_times) for s in seqs]) if seqs else np.array([])
    tpot = [r["tpot"] for r in rows if r["tpot"] is not None]
    start, end = min(r["arrival"] for r in rows), max(r["finish"] for r in rows)
    tokens = sum(len(s.token_times) for s in seqs)
    out: dict[str, Any] = {"n_requests": len(rows), "output_tokens": tokens, "makespan_s": end - start,
                           "throughput_tok_s": tokens / (end - start) if end > start else None,
                           "requests_per_s": len(rows) / (end - start) if end > start else None}
    out |= distribution([r["ttft"] for r in rows], "ttft_s")
    out |= distribution(tbt, "tbt_s")
    out |= distribution(tpot, "tpot_s")
    out |= distribution([r["e2e"] for r in rows], "e2e_s")
    if slo:
        out["slo_attainment"] = slo.attainment(rows)
    return out

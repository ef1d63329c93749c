"""Requests from a workload config (``conf/serve/workload/*.yaml``), synthesised deterministically from a seed.

* arrivals: ``poisson`` (rate), ``gamma`` (rate, cv: burstier for cv > 1), ``burst`` (all at t=0) or ``trace``
  (replay of a CSV/JSONL with Vidur's column names ``arrived_at, num_prefill_tokens, num_decode_tokens``);
* lengths: log-normal input and output lengths with the *means* of ShareGPT as the vLLM paper reports them
  (161 input / 338 output tokens, Kwon et al. 2023, Fig. 11); the spread (``sigma``) and the clipping are ours,
  since the paper gives no dispersion. ``fixed`` and ``uniform`` lengths are for hand-made cases;
* conversations (``turns``): each conversation is a client; turn t+1 arrives ``think`` seconds after turn t
  finished and its prompt is the whole history (earlier prompts and answers) plus a new message;
* images (``images``): images per request, each ``arch.tokens_per_image`` prompt tokens, drawn from a pool so that
  a share of them repeat (what EPD's multimodal-token cache hits).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from kvbench.errors import UsageError


@dataclass
class Request:
    id: int
    arrival: float
    prompt: int  # prompt tokens, history and image tokens included
    output: int  # tokens to generate
    conv: int = -1  # conversation (= client) id; -1: a single-turn request
    turn: int = 0
    history: int = 0  # leading prompt tokens that are earlier turns of the conversation
    images: tuple[int, ...] = ()  # image ids (a repeated id is the same image)
    think_s: float = 0.0  # delay of this turn after the previous one finished (multi-turn)
    next: Request | None = field(default=None, repr=False)  # the conversation's next turn


def lognormal(rng: np.random.Generator, mean: float, sigma: float, lo: int, hi: int, n: int) -> np.ndarray:
    mu = math.log(mean) - sigma**2 / 2
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), lo, hi).astype(int)


def lengths(rng: np.random.Generator, spec: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    kind = spec.dist
    if kind == "lognormal":
        return (lognormal(rng, spec.input_mean, spec.input_sigma, spec.min, spec.max_input, n),
                lognormal(rng, spec.output_mean, spec.output_sigma, spec.min, spec.max_output, n))
    if kind == "uniform":
        return (rng.integers(spec.input[0], spec.input[1] + 1, n), rng.integers(spec.output[0], spec.output[1] + 1, n))
    if kind == "fixed":
        return np.full(n, spec.input), np.full(n, spec.output)
    raise UsageError(f"workload lengths.dist={kind!r}; choose lognormal, uniform or fixed")


def arrivals(rng: np.random.Generator, spec: Any, n: int) -> np.ndarray:
    kind = spec.process
    if kind == "burst":
        return np.zeros(n)
    if spec.rate <= 0:
        raise UsageError(f"workload arrival.rate must be > 0, got {spec.rate}")
    if kind == "poisson":
        gaps = rng.exponential(1 / spec.rate, n)
    elif kind == "gamma":
        shape = 1 / spec.cv**2
        gaps = rng.gamma(shape, 1 / (spec.rate * shape), n)
    else:
        raise UsageError(f"workload arrival.process={kind!r}; choose poisson, gamma, burst or trace")
    return np.cumsum(gaps)


def read_trace(path: str | Path) -> list[tuple[float, int, int]]:
    """(arrival, prompt, output) rows of a CSV or JSONL trace with Vidur's column names."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"workload trace {p} does not exist")
    rows = ([json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.suffix == ".jsonl"
            else list(csv.DictReader(p.open())))
    try:
        return [(float(r["arrived_at"]), int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])) for r in rows]
    except KeyError as err:
        need = "arrived_at, num_prefill_tokens, num_decode_tokens"
        raise UsageError(f"trace {p} lacks column {err}; needs {need}") from None


def image_ids(rng: np.random.Generator, spec: Any, n: int) -> list[tuple[int, ...]]:
    """Per request ``per_request`` images (Poisson when ``poisson``); a share ``repeat`` reuses a seen image."""
    counts = rng.poisson(spec.per_request, n) if spec.get("poisson") else np.full(n, spec.per_request)
    seen: list[int] = []
    out = []
    for c in counts:
        ids = []
        for _ in range(int(c)):
            if seen and rng.random() < spec.get("repeat", 0.0):
                ids.append(seen[int(rng.integers(len(seen)))])
            else:
                seen.append(len(seen))
                ids.append(seen[-1])
        out.append(tuple(ids))
    return out


def single_turn(cfg: Any, rng: np.random.Generator, tokens_per_image: int) -> list[Request]:
    if cfg.arrival.process == "trace":
        rows = read_trace(cfg.arrival.path)[: cfg.get("n_requests") or None]
        return [Request(i, t, p, max(o, 1)) for i, (t, p, o) in enumerate(rows)]
    n = cfg.n_requests
    times = arrivals(rng, cfg.arrival, n)
    phases = list(cfg.get("phases") or [{}])  # a workload change: equal shares of the requests, in order
    out: list[Request] = []
    for k, phase in enumerate(phases):
        spec = OmegaConf.merge(cfg, phase)
        ids = range(k * n // len(phases), (k + 1) * n // len(phases))
        inp, outs = lengths(rng, spec.lengths, len(ids))
        imgs = image_ids(rng, spec.images, len(ids)) if spec.get("images") else [()] * len(ids)
        if k and spec.get("images"):  # image ids stay distinct across phases
            imgs = [tuple(i + 10**6 * k for i in im) for im in imgs]
        out += [Request(i, float(times[i]), int(inp[j]) + len(imgs[j]) * tokens_per_image, int(outs[j]),
                        images=imgs[j]) for j, i in enumerate(ids)]
    return out


def conversations(cfg: Any, rng: np.random.Generator) -> list[Request]:
    """First turns (arriving as the arrival process says), each linked to its later turns through ``next``."""
    spec, n = cfg.turns, cfg.n_requests  # n conversations
    starts = arrivals(rng, cfg.arrival, n)
    firsts, rid = [], 0
    for c in range(n):
        k = min(int(rng.geometric(1 / spec.mean)), spec.max) if spec.mean > 1 else 1  # mean turns ~ spec.mean
        inp, out = lengths(rng, cfg.lengths, k)
        think = rng.exponential(spec.think_s, k)
        history, prev = 0, None
        for t in range(k):
            r = Request(rid, float(starts[c]) if t == 0 else math.nan, history + int(inp[t]), int(out[t]), conv=c,
                        turn=t, history=history, think_s=float(think[t]) if t else 0.0)
            rid += 1
            history += int(inp[t]) + int(out[t])
            if prev is None:
                firsts.append(r)
            else:
                prev.next = r
            prev = r
    return firsts


def build_requests(cfg: Any, seed: int, tokens_per_image: int = 0) -> list[Request]:
    """The workload's requests (first turns for conversations), sorted by arrival; the same seed, the same list."""
    rng = np.random.default_rng(seed)
    reqs = conversations(cfg, rng) if cfg.get("turns") else single_turn(cfg, rng, tokens_per_image)
    if not reqs:
        raise UsageError(f"workload {cfg.name!r} has no requests")
    return sorted(reqs, key=lambda r: (r.arrival, r.id))


def all_turns(firsts: list[Request]) -> list[Request]:
    out = []
    for r in firsts:
        while r is not None:
            out.append(r)
            r = r.next
    return out

"""The ``cpu`` hardware profile, fitted on this machine from real runs of the embedded model ``kvbench-tiny``.

Measured (interleaved, medians of repeats, 1 thread as kvbench runs): prefill forwards at several prompt lengths
and the decode forwards that follow each (their KV lengths), through the engine's public API (``Engine.forward``,
``generate``, ``reset``); and copies (:mod:`kvbench.serve.copybench`). The cost model's own ``iteration_s`` is then
fitted to these times (relative least squares over ``fixed_s``, ``gemm_flops``, ``attn_flops``, ``attn_bw``), so
the fit and the simulator use the same formula. ``per_seq_s`` is 0: the engine runs one sequence at a time
(``batch_limit: 1``), so a per-sequence cost cannot be told apart from ``fixed_s``. Nothing is typed in: every
number comes from a measurement made by this module, and re-running it re-measures (the engine's decode changes).

:func:`validate` runs requests through the real engine one after another and returns measured and predicted TTFT
and time per output token for each.
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from scipy.optimize import least_squares

from kvbench.serve.arch import Arch
from kvbench.serve.cost import Batch, CostModel
from kvbench.serve.hardware import Hardware

TINY = Arch(name="kvbench-tiny", layers=3, hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=128,
            vocab=733, dtype_bytes=4)
PREFILL_LENGTHS = (64, 128, 256, 512, 1024, 1536, 2048)
FIT_KEYS = ("fixed_s", "gemm_flops", "attn_flops", "attn_bw")


def embedded_engine() -> Any:
    """kvbench-tiny in an Engine with the full cache (FullKV), one thread, CPU."""
    from kvbench.budget import Uniform
    from kvbench.engine import Engine
    from kvbench.models import load_model
    from methods.fullkv import FullKV

    torch.set_num_threads(1)
    spec = OmegaConf.create({"pretrained": "embedded:kvbench-tiny", "revision": None, "dtype": "float32",
                             "attn_implementation": "sdpa"})
    model, _ = load_model(spec, torch.device("cpu"))
    return Engine(model, FullKV(), Uniform(), budget=1.0)


def prompt_ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(4, TINY.vocab, (n,), generator=torch.Generator().manual_seed(seed))


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}  # cpu: this thread's CPU time (torch: 1 thread)


def timed_request(eng: Any, n: int, out: int, seed: int, clock: str = "wall") -> tuple[float, float]:
    """One request: (seconds to the first token, prefill + argmax; seconds per later token, generate's loop
    included: what a user of the engine waits per token). ``clock="cpu"`` counts only this thread's CPU time, which
    other jobs on a shared machine do not inflate (on an idle machine the two agree)."""
    now = CLOCKS[clock]
    eng.reset()
    t0 = now()
    logits = eng.forward(prompt_ids(n, seed))
    int(logits.argmax())
    ttft = now() - t0
    t1 = now()
    eng.generate(logits, out)
    return ttft, (now() - t1) / max(out - 1, 1)


def kv_bytes_per_token(eng: Any, n: int = 100) -> float:
    """The engine's real KV bytes per token (``store.nbytes()`` after an n-token prefill): checks the arch's."""
    eng.reset()
    eng.forward(prompt_ids(n, 0))
    return eng.store.nbytes() / n


def measure_round(eng: Any, seed: int, decode_tokens: int = 32, lengths: tuple[int, ...] = PREFILL_LENGTHS,
                  clock: str = "wall") -> list[tuple[Batch, float]]:
    """One pass over the prefill lengths (alternating order) and the decode steps after each."""
    order = lengths if seed % 2 == 0 else lengths[::-1]
    rows: list[tuple[Batch, float]] = []
    for n in order:
        ttft, tpot = timed_request(eng, n, decode_tokens + 1, seed=seed * 7919 + n, clock=clock)
        rows.append((Batch(prefill=[(n, 0)]), ttft))
        rows.append((Batch(decode=[n + decode_tokens // 2]), tpot))  # the mean KV length of those steps
    return rows


def median_by_batch(rows: list[tuple[Batch, float]]) -> list[tuple[Batch, float]]:
    """Median seconds per distinct batch over the rounds (the validation runs are summarised the same way, so a
    burst of load on the shared machine moves neither)."""
    groups: dict[str, tuple[Batch, list[float]]] = {}
    for b, t in rows:
        groups.setdefault(repr(b), (b, []))[1].append(t)
    return [(b, statistics.median(ts)) for b, ts in groups.values()]


def fit(samples: list[tuple[Batch, float]], base: dict[str, float]) -> dict[str, float]:
    """Fit FIT_KEYS (log-parametrised, so positive) to minimise relative errors of CostModel.iteration_s."""
    t = np.array([s for _, s in samples])

    def hw(x: np.ndarray) -> Hardware:
        return Hardware(**{**base, **dict(zip(FIT_KEYS, np.exp(x), strict=True))})

    def resid(x: np.ndarray) -> np.ndarray:
        cost = CostModel(TINY, hw(x))
        return np.array([cost.iteration_s(b) for b, _ in samples]) / t - 1

    x0 = np.log([float(np.min(t)) * 0.8, 1e9, 1e9, 1e9])
    sol = least_squares(resid, x0, method="trf")
    return dict(zip(FIT_KEYS, map(float, np.exp(sol.x)), strict=True))


def mem_total() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return float(line.split()[1]) * 1024
    return 8 * 2**30


VALIDATION = ((1024, 32),)  # a single request
SEQUENTIAL = ((300, 16), (1200, 24), (700, 8), (1500, 20), (200, 12), (900, 16))  # a small batch, served in turn
# (prompt, output) pairs of a quick check (~10 s: the fast test): shorter prompts and outputs, the same two cases
QUICK = {"lengths": (64, 256, 512, 1024, 1536), "decode_tokens": 16,
         "cases": {"single": ((768, 16),), "sequential": ((200, 8), (900, 12), (500, 8), (1200, 10))}}


def validation_requests(cases: dict[str, tuple[tuple[int, int], ...]] | None = None) -> dict[str, list[Any]]:
    from kvbench.serve.workload import Request

    cases = cases or {"single": VALIDATION, "sequential": SEQUENTIAL}
    return {name: [Request(i, 0.0, n, o) for i, (n, o) in enumerate(lengths)] for name, lengths in cases.items()}


def calibrate(rounds: int = 3, lengths: tuple[int, ...] = PREFILL_LENGTHS, decode_tokens: int = 32,
              cases: dict[str, tuple[tuple[int, int], ...]] | None = None, clock: str = "wall") -> dict[str, Any]:
    """Measure and fit, interleaving the calibration passes with the validation runs (so both see the same load
    on a shared machine); returns ``{"hardware", "samples", "copy", "validation", "meta"}``. ``lengths``: the
    prefill lengths fitted; ``cases``: the validation requests (``QUICK`` holds a quick set of all three);
    ``clock``: ``wall`` (the profile: latency as a user sees it) or ``cpu`` (the fast test on a shared machine)."""
    from kvbench.serve.copybench import measure as measure_copies

    copies = measure_copies(block_bytes=16 * TINY.kv_bytes_per_token_layer)
    base = {"name": "cpu", "mem_bytes": mem_total(), "weight_bw": copies.bw, "pcie_bw": copies.bw,
            "nvlink_bw": copies.bw, "copy_call_s": copies.call_s, "per_seq_s": 0.0, "batch_limit": 1,
            "gemm_flops": 1.0, "attn_flops": 1.0, "attn_bw": 1.0, "fixed_s": 0.0}
    reqs = validation_requests(cases)
    eng = embedded_engine()
    raw: list[tuple[Batch, float]] = []
    real: dict[str, list[list[Measured]]] = {k: [] for k in reqs}
    gc.collect()
    gc.disable()  # collecting a caller's large heap (pytest's, a notebook's) inside a timed step is no engine cost
    try:
        with eng:
            timed_request(eng, 256, 4, 0)  # warm-up
            engine_kv = kv_bytes_per_token(eng)
            for r in range(rounds):
                raw += measure_round(eng, r, decode_tokens, lengths, clock)
                for name, rs in reqs.items():
                    real[name].append(run_real(rs, eng, seed=1000 * r, clock=clock))
    finally:
        gc.enable()
    samples = median_by_batch(raw)
    hw = {**base, **fit(samples, base)}
    cost = CostModel(TINY, Hardware(**hw))
    rows = [{"prefill": b.prefill, "decode": b.decode, "measured_s": t, "fitted_s": cost.iteration_s(b)}
            for b, t in samples]
    validation = {name: compare(reqs[name], real[name], Hardware(**hw)) for name in reqs}
    return {"hardware": hw, "samples": rows, "validation": validation,
            "copy": {"call_s": copies.call_s, "bw": copies.bw, "rows": copies.rows},
            "engine_kv_bytes_per_token": engine_kv, "arch_kv_bytes_per_token": TINY.kv_bytes_per_token,
            "meta": {"torch": torch.__version__, "machine": platform.machine(), "rounds": rounds, "clock": clock,
                     "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}


def write_calibration(path: str | Path, rounds: int = 3, **options: Any) -> dict[str, Any]:
    """:func:`calibrate` (``options``: its lengths, decode_tokens, cases, clock) into a calibration file."""
    data = calibrate(rounds, **options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data


@dataclass
class Measured:
    prompt: int
    output: int
    ttft_s: float  # from the first arrival (all arrive at once): includes the requests served before
    tpot_s: float


def run_real(requests: list[Any], eng: Any, seed: int = 0, clock: str = "wall") -> list[Measured]:
    """Serve ``requests`` (all arrived at t=0) one after another on the real engine, as the cpu profile models."""
    out, now = [], CLOCKS[clock]
    t0 = now()
    for r in requests:
        start = now()
        ttft, tpot = timed_request(eng, r.prompt, r.output, seed + r.id, clock)
        out.append(Measured(r.prompt, r.output, start - t0 + ttft, tpot))
    return out


def predict(requests: list[Any], hw: Hardware) -> dict[int, dict[str, Any]]:
    """The simulator's per-request rows for ``requests`` on ``hw`` (the vLLM-like replica, one at a time)."""
    import copy

    from kvbench.serve.core import ServerConfig
    from kvbench.serve.system import SimContext
    from kvbench.serve.vllm import VLLM

    ctx = SimContext(TINY, hw, ServerConfig(max_seqs=1, kv_gb=1.0), workload=None)
    return {r["id"]: r for r in VLLM().simulate(copy.deepcopy(requests), ctx).requests}


def compare(requests: list[Any], rounds: list[list[Measured]], hw: Hardware) -> list[dict[str, float]]:
    """Measured (median over rounds) vs predicted TTFT and TPOT of each request."""
    pred = predict(requests, hw)
    rows = []
    for i, r in enumerate(requests):
        ttft = statistics.median(m[i].ttft_s for m in rounds)
        tpot = statistics.median(m[i].tpot_s for m in rounds)
        rows.append({"prompt": r.prompt, "output": r.output, "ttft_measured_s": ttft,
                     "ttft_predicted_s": pred[r.id]["ttft"], "tpot_measured_s": tpot,
                     "tpot_predicted_s": pred[r.id]["tpot"]})
    return rows


def relative_errors(rows: list[dict[str, float]]) -> dict[str, float]:
    """Mean |predicted / measured - 1| of TTFT and of TPOT over the requests."""
    return {k: statistics.fmean(abs(r[f"{k}_predicted_s"] / r[f"{k}_measured_s"] - 1) for r in rows)
            for k in ("ttft", "tpot")}

"""``run(cfg)``: one simulation into one deterministic run directory (the pure function under ``__main__``).

    <results>/serve/<system>/<workload>/<hardware>/<arch>/kv=<full|method-allocator-b<budget>>/slo=<tag>/seed=<s>/
        config.yaml      resolved config + hash (+ the calibration file's SHA-256 for hardware=cpu)
        metrics.json     the system's metrics, each baseline's, and system / baseline ratios; written last
        requests.csv     one row per request and system: arrival, TTFT, TPOT, e2e, preemptions
        iterations.csv   one row per iteration and system: time, prefill / decode sequences, tokens, KV bytes
        *.png            figures (TTFT and TBT distributions, KV memory over time; system-specific ones)

A finished directory returns its metrics at once; a different configuration for it is refused (``overwrite=true``
discards it). Simulations are deterministic: the same config gives the same files.
"""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kvbench.errors import UsageError
from kvbench.identity import sha256_file
from kvbench.results import RunStore
from kvbench.serve.arch import arch_from_cfg
from kvbench.serve.core import ServerConfig
from kvbench.serve.hardware import hardware_from_cfg
from kvbench.serve.kvsource import KVPolicy, kv_policy
from kvbench.serve.slo import attainment_vs_scale, parse_slo, resolve, slo_tag
from kvbench.serve.system import SimContext, SimResult, System
from kvbench.serve.workload import build_requests

SERVER_CHOICES = {"preemption": ("recompute", "swap"), "scheduler": ("fcfs", "priority")}


def server_config(node: Any, kv: KVPolicy) -> ServerConfig:
    values = dict(node)
    for key, allowed in SERVER_CHOICES.items():
        if values.get(key) not in allowed:
            raise UsageError(f"server.{key}={values.get(key)!r}; choose one of {', '.join(allowed)}")
    try:
        return ServerConfig(**values, kv_ratio=kv.kept, compress_frac=kv.compress_frac)
    except TypeError as err:
        raise UsageError(f"server: {err}") from None


def run_dir(cfg: DictConfig, kv: KVPolicy) -> Path:
    parts = (cfg.system.name, cfg.workload.name, cfg.hardware.name, cfg.arch.name, f"kv={kv.tag}",
             f"slo={slo_tag(cfg.get('slo'))}", f"seed={cfg.seed}")
    return Path(cfg.paths.results, "serve", *map(str, parts))


def calibrate_file(path: Path, rounds: int) -> None:
    from kvbench.serve.calibrate import write_calibration  # loads torch and the embedded model

    write_calibration(path, rounds)


def context(cfg: DictConfig, kv: KVPolicy, out_dir: Path) -> SimContext:
    arch = arch_from_cfg(cfg.arch)
    hw = hardware_from_cfg(cfg.hardware, calibrate=calibrate_file)
    slo, rule = parse_slo(cfg.get("slo"))
    return SimContext(arch, hw, server_config(cfg.server, kv), cfg.workload, int(cfg.seed), slo=slo, slo_rule=rule,
                      out_dir=out_dir)


def simulate_all(system: System, cfg: DictConfig, ctx: SimContext) -> dict[str, SimResult]:
    """The system and each of its baselines on copies of the same requests."""
    requests = build_requests(cfg.workload, int(cfg.seed), ctx.arch.tokens_per_image)
    resolve(system, requests, ctx)  # a scaled SLO: the reference system's unloaded latency, before the runs
    runs = {system.name: system.simulate(copy.deepcopy(requests), ctx)}
    for name, base in system.baselines().items():
        runs[name] = base.simulate(copy.deepcopy(requests), ctx)
    return runs


RATIO_KEYS = ("ttft_s_p95", "ttft_s_p99", "tbt_s_p99", "tbt_s_p99.9", "tpot_s_mean", "throughput_tok_s",
              "decode_tok_s", "slo_attainment", "swap_bytes", "copy_calls", "peak_kv_bytes", "fragmentation",
              "hit_ratio", "tokens_per_s", "bytes_to_device")


def ratios(runs: dict[str, SimResult], main: str) -> dict[str, dict[str, float]]:
    """baseline / system for every numeric key of RATIO_KEYS both have (> 1: the system is lower)."""
    out = {}
    ours = runs[main].metrics
    for name, res in runs.items():
        if name != main:
            out[name] = {k: res.metrics[k] / ours[k] for k in RATIO_KEYS
                         if isinstance(ours.get(k), (int, float)) and ours.get(k) and res.metrics.get(k) is not None}
    return out


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


ITER_COLS = ("time", "prefill_seqs", "decode_seqs", "tokens", "kv_bytes", "duration_s")


def write_outputs(out: Path, runs: dict[str, SimResult]) -> None:
    write_rows(out / "requests.csv", [{"system": n, **r} for n, res in runs.items() for r in res.requests])
    write_rows(out / "iterations.csv", [{"system": n, **dict(zip(ITER_COLS, row, strict=False))}
                                        for n, res in runs.items() for row in res.iterations])


def run(cfg: DictConfig) -> dict[str, Any]:
    """Simulate (or return the finished) run directory of ``cfg``; returns its metrics."""
    kv = kv_policy(cfg.kv)
    out = run_dir(cfg, kv)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved = {k: v for k, v in resolved.items() if k != "figures"}
    store = RunStore(out, resolved)
    if cfg.get("overwrite"):
        store.discard()  # open() moves the old files aside once the directory is claimed
    elif store.complete and store.owned():
        return store.load_metrics()
    ctx = context(cfg, kv, out)  # may calibrate (hardware=cpu) before the directory is claimed
    inputs = {"calibration": sha256_file(cfg.hardware.calibration)} if cfg.hardware.get("calibration") else {}
    store.open(inputs)
    system: System = instantiate(cfg.system)
    runs = simulate_all(system, cfg, ctx)
    kv_info = {"kept": kv.kept, "compress_frac": kv.compress_frac, "tag": kv.tag, "label": kv.label,
               "source": kv.source, "score": kv.score}
    metrics = {"system": system.name, "workload": cfg.workload.name, "hardware": cfg.hardware.name,
               "arch": cfg.arch.name, "seed": int(cfg.seed), "kv": kv_info,
               "metrics": runs[system.name].metrics, "real_cpu": system.measurements(ctx),
               "baselines": {n: r.metrics for n, r in runs.items() if n != system.name},
               "baseline_over_system": ratios(runs, system.name),
               "trace_digest": {n: r.digest for n, r in runs.items()}, "config_hash": store.hash, "run_dir": str(out),
               "headline": list(system.headline), "slo": ctx.slo.as_dict() if ctx.slo else None,
               "slo_vs_scale": attainment_vs_scale(runs, ctx.slo)}  # {} for an absolute SLO
    write_outputs(out, runs)
    if cfg.get("figures", True):
        from kvbench.serve.report import run_figures

        run_figures(out, runs, system.name, system.headline, metrics["slo"], metrics["slo_vs_scale"])
    store.write_metrics(metrics)
    store.unlock()
    return metrics

"""Per-method prefill / compression / decode times and KV bytes (a benchmark script, not a timed test).

    python scripts/efficiency.py                                   # embedded model, every method, 2048 tokens
    python scripts/efficiency.py --model kvbench-tiny --lengths 1024 4096 --budget 0.2 --decode 32 --repeats 3
    python scripts/efficiency.py --device cuda --model llama3.1-8b-instruct --lengths 16384

Methods and allocators come from ``conf/`` (composed with Hydra), so the numbers are those of the real configs.
Times are medians over ``--repeats`` rounds after one warm-up round; a round runs every method once, so the
methods are measured interleaved and share the machine's noise. ``compress %`` is the median over rounds of
compression / prefill of the same run (the figure to compare on a noisy machine). Prefill excludes the compression
inside it; decode-time eviction (CAKE) is part of ``decode ms/tok`` and also shown alone as ``evict ms/tok``.
Bytes are exact (the engine's own storage).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from kvbench.budget import Allocator, tokens_per_head
from kvbench.engine import Engine
from kvbench.method import Method
from kvbench.models import load_model, pick_device
from kvbench.pipeline import sync_time

CONF = Path(__file__).resolve().parents[1] / "conf"


def text_methods() -> list[str]:
    """Every conf/method option of the text engine (``family: var`` methods such as HACK run on kvbench.var)."""
    targets = {f.stem: OmegaConf.load(f).get("_target_") for f in sorted((CONF / "method").glob("*.yaml"))}
    return [name for name, target in targets.items()  # variants (no _target_) extend a text method's file
            if target is None or get_class(target).family != "var"]


def compressed_prefill(eng: Engine, ids: torch.Tensor) -> torch.Tensor:
    """The method's prefill. Episodic methods (EpiCache) build one episode's cache: block-wise prefill with the
    last 256 prompt tokens as the probe and uniform layer budgets (a run builds one cache per episode)."""
    if not eng.method.episodic:
        return eng.forward(ids, compress=True)
    eng.layer_keep = [tokens_per_head(eng.budget, ids.numel())] * eng.n_layers
    probe = ids[-min(256, ids.numel()) :]
    for start in range(0, ids.numel(), eng.method.block):
        logits = eng.forward(ids[start : start + eng.method.block])
        eng.probe(probe)
    return logits


def build(method_name: str) -> tuple[Method, Allocator]:
    """The method and allocator of ``conf/method/<name>.yaml``, built once and used for every round, as a run
    builds them once for all its samples (``kvbench.runner.build_method``): scratch buffers a method keeps
    (``kvbench.ops.Workspace``) are allocated by the warm-up round, as by a run's first sample."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={method_name}"])
    return instantiate(cfg.method), instantiate(cfg.allocator)


def measure(model: torch.nn.Module, built: tuple[Method, Allocator], budget: float, ids: torch.Tensor, decode: int,
            backend: str) -> dict[str, float]:
    """One compressed prefill plus ``decode`` greedy steps; times in seconds, bytes exact."""
    method, allocator = built
    budget = budget if method.layer_store == "evict" else 1.0  # quantising methods keep every token
    with Engine(model, method, allocator, budget, backend=backend) as eng:
        eng.reset()
        t0 = sync_time(eng.device)
        logits = compressed_prefill(eng, ids)
        prefill = sync_time(eng.device) - t0
        compress = eng.compress_seconds  # before decoding: decode-time eviction adds to it
        kept, peak = eng.store.nbytes(), eng.store.peak_bytes
        full_per_entry = eng.layer_kind.full_bytes(eng.store.layers) / eng.store.n_entries()  # full precision
        full = full_per_entry * ids.numel() * sum(layer.n_heads for layer in eng.store.layers)
        _, times = eng.generate(logits, decode + 1)
        evict = (eng.compress_seconds - compress) / len(times)
    return {"prefill_ms": 1000 * (prefill - compress), "compress_ms": 1000 * compress,
            "compress_pct": 100 * compress / (prefill - compress), "decode_ms": 1000 * statistics.median(times),
            "evict_ms": 1000 * evict, "kv_full_mib": full / 2**20, "kv_kept_mib": kept / 2**20,
            "peak_kv_mib": peak / 2**20}


COLUMNS = [("prefill ms", "prefill_ms", ".1f"), ("compress ms", "compress_ms", ".1f"),
           ("compress %", "compress_pct", ".1f"), ("decode ms/tok", "decode_ms", ".2f"),
           ("evict ms/tok", "evict_ms", ".2f"), ("KV full MiB", "kv_full_mib", ".2f"),
           ("KV kept MiB", "kv_kept_mib", ".2f"), ("peak KV MiB", "peak_kv_mib", ".2f")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="kvbench-tiny", help="a conf/model option")
    p.add_argument("--methods", nargs="*", default=text_methods())
    p.add_argument("--lengths", nargs="*", type=int, default=[2048])
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--decode", type=int, default=16, help="decode steps timed per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (as the runner's `threads` key)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        spec = compose("config", overrides=[f"model={args.model}"]).model
    model, tok = load_model(spec, pick_device(args.device))
    gen = torch.Generator().manual_seed(0)
    width = max(len(m) for m in args.methods) + 2
    print(f"{'method':<{width}}{'tokens':>8}" + "".join(f"{title:>{len(title) + 2}}" for title, _, _ in COLUMNS))
    for n in args.lengths:
        ids = torch.randint(5, len(tok), (n,), generator=gen)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in args.methods}
        built = {name: build(name) for name in args.methods}
        for round_ in range(args.repeats + 1):  # round 0 warms up; every round runs every method once
            for name in args.methods:
                result = measure(model, built[name], args.budget, ids, args.decode, spec.attn_implementation)
                if round_:
                    runs[name].append(result)
        for name, results in runs.items():
            med = {key: statistics.median(r[key] for r in results) for key in results[0]}
            cells = "".join(f"{med[key]:>{len(title) + 2}{fmt}}" for title, key, fmt in COLUMNS)
            print(f"{name:<{width}}{n:>8}{cells}")

if __name__ == "__main__":
    main()

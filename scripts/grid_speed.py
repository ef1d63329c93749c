"""Time a method grid with one prefill (``methods=[...]``) against one budget-sweep job per method.

Runs, into a temporary results root, ``run(cfg)`` for ``methods=[m1,...,mk] budget=[b1,...]`` (one job, one prefill
per prompt for every method and budget that allows it, ``kvbench.sweep``) and, interleaved with it, k jobs
``method=<m> budget=[b1,...]`` (one prefill per prompt and method), on the embedded default (``kvbench-tiny``,
``synth_multikey_dense``), ``--repeats`` times; prints the median wall and CPU seconds, their ratio and the load
average (the machine may be shared: compare ratios, not seconds). Each timed call is a whole ``run()``: model and
sample loading, prefill, compression, decoding, writing the run directories. ``--breakdown`` adds where the time
goes (from the first repeat's records).

    .venv/bin/python scripts/grid_speed.py      # fullkv,snapkv,adakv,defensivekv x 0.1,0.2,0.5, 32 samples
    .venv/bin/python scripts/grid_speed.py --limit 8 --protocol query_agnostic --breakdown
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from kvbench.runner import run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from sweep_speed import breakdown  # noqa: E402  (the budget sweep's timing script, next to this one)


def timed_job(root: Path, overrides: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds of this process of one job, as ``python -m kvbench <overrides>`` runs it."""
    overrides = [f"paths.results={root}", "progress=false", *overrides]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):  # the per-run tables
        run(cfg, overrides=overrides)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="fullkv,snapkv,adakv,defensivekv")
    ap.add_argument("--budgets", default="0.1,0.2,0.5")
    ap.add_argument("--limit", type=int, default=32, help="samples (contexts) per run; 32 = the whole default task")
    ap.add_argument("--protocol", default="query_aware")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--breakdown", action="store_true")
    args = ap.parse_args()
    methods = args.methods.split(",")
    common = [f"limit={args.limit}", f"protocol={args.protocol}", "threads=1", f"budget=[{args.budgets}]"]
    separate, grid, load = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        timed_job(Path(tmp) / "warmup", ["method=snapkv", "budget=0.5", "limit=1"])  # imports, first-call overheads
        for i in range(args.repeats):
            load.append(os.getloadavg()[0])
            times = [timed_job(Path(tmp) / f"separate{i}" / m, [*common, f"method={m}"]) for m in methods]
            separate.append(tuple(sum(t) for t in zip(*times, strict=True)))
            grid.append(timed_job(Path(tmp) / f"grid{i}", [*common, f"methods=[{args.methods}]"]))
        per_method = [breakdown(Path(tmp) / "separate0" / m) for m in methods]  # one prefill per prompt and method
        parts = {"separate": {key: sum(p[key] for p in per_method) for key in per_method[0]},
                 "grid": breakdown(Path(tmp) / "grid0")}
    k, n = len(methods), len(args.budgets.split(","))
    print(f"{k} methods x {n} budgets, {args.limit} samples, {args.protocol}, threads=1, median of {args.repeats} "
          f"(load average {min(load):.1f}-{max(load):.1f}; whole run(): loading, prefill, compression, decoding, "
          "writing)")
    print(f"{'':40}{'wall s':>8}{'CPU s':>8}{'wall ratio':>12}{'CPU ratio':>11}")
    base = [statistics.median(t) for t in zip(*separate, strict=True)]
    rows = [(f"{k} jobs, one per method ({n} budgets each)", base),
            ("1 job, methods=[...] (one prefill)", [statistics.median(t) for t in zip(*grid, strict=True)])]
    for name, (wall, cpu) in rows:
        print(f"{name:<40}{wall:8.2f}{cpu:8.2f}{wall / base[0]:11.2f}x{cpu / base[1]:10.2f}x")
    best_sep, best_grid = ([min(t) for t in zip(*runs, strict=True)] for runs in (separate, grid))
    print(f"{'fastest of the repeats (ratio)':<40}{'':16}{best_grid[0] / best_sep[0]:11.2f}x"
          f"{best_grid[1] / best_sep[1]:10.2f}x")
    if args.breakdown:
        for name, p in parts.items():
            print(f"  {name:<9} " + "  ".join(f"{key} {v:.2f} s" for key, v in p.items())
                  + f"  (sum {sum(p.values()):.2f} s)")


if __name__ == "__main__":
    main()

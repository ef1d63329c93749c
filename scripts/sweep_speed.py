"""Time a budget sweep with one shared prefill against a single budget (issue target: k = 5 in <= 1.5x).

Runs, into a temporary results root, ``run(cfg)`` for one budget and for ``budget=[b1, ..., bk]`` (one prefill per
prompt, ``kvbench.sweep``) on the embedded default (``kvbench-tiny``, ``synth_multikey_dense``), alternating them
``--repeats`` times, and prints the median wall times and their ratio; also the time k separate runs would take.
Each timed call is a whole ``run()``: model and sample loading, prefill, compression, decoding, writing the run
directories. ``--breakdown`` adds where the time goes (from the records: prefill, compression, decoding).

    .venv/bin/python scripts/sweep_speed.py                # snapkv, the 32 samples, budgets 0.05 0.1 0.2 0.3 0.5
    .venv/bin/python scripts/sweep_speed.py --method adakv --limit 8 --breakdown
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from kvbench.runner import run

ROOT = Path(__file__).resolve().parents[1]


def timed_run(root: Path, overrides: list[str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds of this process (all threads) of one ``run(cfg)``."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.results={root}", "progress=false", *overrides])
    t0, c0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(io.StringIO()):  # the per-run tables
        run(cfg)
    return time.perf_counter() - t0, time.process_time() - c0


def breakdown(root: Path) -> dict[str, float]:
    """Seconds spent per phase, summed over every record under ``root`` (a shared prefill counted once)."""
    prefill: dict[str, float] = {}
    compress = decode = 0.0
    for path in root.rglob("predictions.jsonl"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            prefill[r["id"]] = r["prefill_s"]  # the same number in every budget's record of a shared prefill
            compress += r["compress_s"]
            decode += (r["decode_s_per_token"] or 0.0) * max(r["new_tokens"] - 1, 0) + (r.get("question_s") or 0.0)
    return {"prefill": sum(prefill.values()), "compression": compress, "decode": decode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="snapkv")
    ap.add_argument("--budgets", default="0.05,0.1,0.2,0.3,0.5")
    ap.add_argument("--single", default="0.2", help="the one budget the sweep is compared with")
    ap.add_argument("--limit", type=int, default=32, help="samples (contexts) per run; 32 = the whole default task")
    ap.add_argument("--protocol", default="query_aware")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--breakdown", action="store_true")
    args = ap.parse_args()
    common = [f"method={args.method}", f"limit={args.limit}", f"protocol={args.protocol}", "threads=1"]
    k = len(args.budgets.split(","))
    single, sweep = [], []
    with tempfile.TemporaryDirectory() as tmp:
        timed_run(Path(tmp) / "warmup", [*common, "budget=0.5", "limit=1"])  # imports, first-call overheads
        for i in range(args.repeats):
            single.append(timed_run(Path(tmp) / f"single{i}", [*common, f"budget={args.single}"]))
            sweep.append(timed_run(Path(tmp) / f"sweep{i}", [*common, f"budget=[{args.budgets}]"]))
        parts = {"one budget": breakdown(Path(tmp) / "single0"), f"{k} budgets": breakdown(Path(tmp) / "sweep0")}
    print(f"{args.method}, {args.limit} samples, {args.protocol}, threads=1, median of {args.repeats} "
          f"(whole run(): loading, prefill, compression, decoding, writing)")
    print(f"{'':34}{'wall s':>8}{'CPU s':>8}{'wall ratio':>12}{'CPU ratio':>11}")
    one = [statistics.median(t) for t in zip(*single, strict=True)]
    rows = [(f"one budget ({args.single})", one), (f"{k} budgets, one shared prefill",
            [statistics.median(t) for t in zip(*sweep, strict=True)]), (f"{k} separate runs (k x one)",
            [k * x for x in one])]
    for name, (wall, cpu) in rows:
        print(f"{name:<34}{wall:8.2f}{cpu:8.2f}{wall / one[0]:11.2f}x{cpu / one[1]:10.2f}x")
    best_one, best_all = ([min(t) for t in zip(*runs, strict=True)] for runs in (single, sweep))
    print(f"{'fastest of the repeats (ratio)':<34}{'':16}{best_all[0] / best_one[0]:11.2f}x"
          f"{best_all[1] / best_one[1]:10.2f}x")
    if args.breakdown:  # from the first repeat's records (wall seconds)
        for name, p in parts.items():
            print(f"  {name:<12} " + "  ".join(f"{key} {v:.2f} s" for key, v in p.items())
                  + f"  (sum {sum(p.values()):.2f} s)")
        one_s, all_s = (sum(p.values()) for p in parts.values())
        print(f"  prefill + compression + decode alone: ratio {all_s / one_s:.2f}x")

if __name__ == "__main__":
    main()

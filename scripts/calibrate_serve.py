"""Fit the ``cpu`` serving profile on this machine and print predicted vs measured latencies of real runs.

    python scripts/calibrate_serve.py                       # -> results/serve/calibration/cpu.json
    python scripts/calibrate_serve.py --out /tmp/cpu.json --rounds 5
    python scripts/calibrate_serve.py --quick --clock cpu --out /tmp/quick.json   # CI's quick check (~10-20 s)

Measures the embedded model through the kvbench engine (prefill and decode at several lengths, 1 thread) and
block copies, fits the cost model, then compares its predictions with real runs: one request, and six requests
served one after another (TTFT counted from their common arrival). Timings on a shared machine are noisy; the
calibration and the validation runs are interleaved so that both see the same load. ``--clock cpu`` times the
engine thread's CPU time instead of wall time (not inflated by other jobs; a file written so predicts compute time,
not the latency a user waits, so keep it out of the profile's default path).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvbench.serve.calibrate import QUICK, relative_errors, write_calibration  # noqa: E402


def table(rows: list[dict[str, float]]) -> str:
    lines = ["| prompt | output | TTFT measured (s) | TTFT predicted (s) | TPOT measured (ms) | TPOT predicted (ms) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['prompt']} | {r['output']} | {r['ttft_measured_s']:.3f} | {r['ttft_predicted_s']:.3f} | "
                     f"{1e3 * r['tpot_measured_s']:.2f} | {1e3 * r['tpot_predicted_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/serve/calibration/cpu.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="shorter prefill lengths and validation requests")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()
    if args.clock == "cpu" and args.out == ap.get_default("out"):
        ap.error("--clock cpu: give --out elsewhere (the cpu profile's file must hold wall-clock latencies)")
    data = write_calibration(args.out, args.rounds, **(QUICK if args.quick else {}), clock=args.clock)
    hw = data["hardware"]
    print(f"wrote {args.out}: fixed {1e3 * hw['fixed_s']:.2f} ms/iteration, GEMM {hw['gemm_flops'] / 1e9:.1f} "
          f"GFLOP/s, prefill attention {hw['attn_flops'] / 1e9:.1f} GFLOP/s, decode KV read "
          f"{hw['attn_bw'] / 1e9:.2f} GB/s, copy {1e6 * hw['copy_call_s']:.1f} us/call + "
          f"{hw['pcie_bw'] / 1e9:.1f} GB/s")
    for name, rows in data["validation"].items():
        err = relative_errors(rows)
        print(f"\n{name}: mean |error| TTFT {100 * err['ttft']:.1f} %, TPOT {100 * err['tpot']:.1f} %\n")
        print(table(rows))


if __name__ == "__main__":
    main()

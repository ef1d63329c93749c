"""``python -m kvbench.var.table [RESULTS]``: the method x budget table of finished VAR runs (markdown).

Reads ``<results>/<task>/<model>/<method>/budget=<b>/seed=<s>/metrics.json`` (``kvbench.var.run``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from kvbench.results import results_root


def load(root: Path, task: str, model: str) -> pd.DataFrame:
    rows = []
    for path in sorted((root / task / model).glob("*/budget=*/seed=*/metrics.json")):
        m = json.loads(path.read_text())
        rows.append({"method": m["run"]["method"], "budget": m["run"]["budget"], "seed": m["run"]["seed"],
                     "tokens %": 100 * m["score"]["token_agreement"],
                     "last scale %": 100 * m["token_agreement_by_scale"][-1],
                     **({"bits %": 100 * m["bit_agreement"]} if "bit_agreement" in m else {}),
                     "PSNR dB": m["score"]["psnr"], "SSIM": m["score"]["ssim"],
                     "peak KV %": 100 * m["peak_kv_bytes"] / m["full_peak_kv_bytes"],
                     "final KV %": 100 * m["final_kv_bytes"] / m["full_final_kv_bytes"],
                     "peak KV MiB": m["peak_kv_bytes"] / 2**20})
    if not rows:
        raise SystemExit(f"no finished VAR runs under {root / task / model}")
    return pd.DataFrame(rows)


def table(df: pd.DataFrame) -> str:
    out = df.groupby(["budget", "method"]).mean(numeric_only=True).drop(columns="seed").round(2).reset_index()
    return out.to_markdown(index=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="?", type=Path, default=None, help="results root (default: paths.results)")
    ap.add_argument("--task", default="var_class")
    ap.add_argument("--model", default="kvbench-tiny-var")
    args = ap.parse_args()
    print(table(load(results_root(args.results), args.task, args.model)))


if __name__ == "__main__":
    main()

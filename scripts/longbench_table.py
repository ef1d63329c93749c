"""LongBench / LongBench-E tables from finished runs: one row per (model, method, allocator, protocol, budget),
one column per dataset (eval.py's rounded score), plus the chosen average.

    python scripts/longbench_table.py                          # LongBench, en16 average (SnapKV/PyramidKV/CAKE)
    python scripts/longbench_table.py --average all21          # or leaderboard_en / leaderboard_zh (by category)
    python scripts/longbench_table.py --e                      # LongBench-E: dataset x bucket columns

An average is printed only for rows that have every dataset it needs (else empty).
"""

from __future__ import annotations

import argparse
import math

import pandas as pd

from kvbench.errors import UsageError
from kvbench.results import finished_runs
from kvbench.tasks import longbench as lb

KEYS = ["model.name", "method.name", "allocator.name", "protocol", "budget"]
AVERAGES = (*lb.SUBSETS, "leaderboard_en", "leaderboard_zh")


def row_average(scores: dict[str, float], how: str) -> float | None:
    scores = {k: v for k, v in scores.items() if not (isinstance(v, float) and math.isnan(v))}
    try:
        if how.startswith("leaderboard_"):
            return round(lb.category_average(scores, how.split("_")[1]), 2)
        return lb.average(scores, how)
    except UsageError:
        return None


def table(df: pd.DataFrame, average: str = "en16", e: bool = False) -> pd.DataFrame:
    """The pivot of ``load_results(...)`` rows of LongBench (or LongBench-E) runs."""
    prefix = "longbench_e/" if e else "longbench/"
    runs = df[df["task.name"].astype(str).str.startswith(prefix)].copy()
    if runs.empty:
        raise UsageError(f"no finished {prefix.rstrip('/')} runs found")
    runs["dataset"] = runs["task.name"].str[len(prefix):]
    if e:
        cols = [f"official.buckets.{b}" for b, _ in lb.BUCKETS]
        long = runs.melt(id_vars=[*KEYS, "dataset"], value_vars=cols, var_name="bucket", value_name="score")
        long["dataset"] = long["dataset"] + " " + long["bucket"].str.rsplit(".", n=1).str[1]
        return long.pivot_table(index=KEYS, columns="dataset", values="score")
    wide = runs.pivot_table(index=KEYS, columns="dataset", values="official.score")
    wide[f"avg_{average}"] = [row_average(dict(r), average) for _, r in wide.iterrows()]
    return wide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=None, help="results root (default: paths.results, i.e. "
                        "$KVBENCH_RESULTS or results)")
    parser.add_argument("--average", default="en16", choices=AVERAGES)
    parser.add_argument("--e", action="store_true", help="LongBench-E buckets instead of LongBench")
    args = parser.parse_args()
    try:
        print(table(finished_runs(args.results), args.average, args.e).to_markdown(floatfmt=".2f"))
    except UsageError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    main()

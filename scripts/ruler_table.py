"""RULER table from finished runs: one row per (model, method, allocator, protocol, budget, length), one column per
task (RULER's score: ``round(100 * mean, 2)`` of string_match_all / string_match_part), and the mean of the 13 task
scores per length (RULER's usual headline; printed only for rows that have all 13 tasks).

    python scripts/ruler_table.py [--results results]
"""

from __future__ import annotations

import argparse
import re

import pandas as pd

from kvbench.errors import UsageError
from kvbench.results import finished_runs
from kvbench.tasks.ruler import TASKS

KEYS = ["model.name", "method.name", "allocator.name", "protocol", "budget"]
COLUMN = re.compile(r"^score_by_length\.(\d+)\.(string_match_all|string_match_part)$")


def table(df: pd.DataFrame) -> pd.DataFrame:
    """The pivot of ``load_results(...)`` rows of ``ruler/*`` runs."""
    runs = df[df["task.name"].astype(str).str.startswith("ruler/")]
    if runs.empty:
        raise UsageError("no finished ruler runs found")
    rows = []
    for _, run in runs.iterrows():
        for col, value in run.items():
            m = COLUMN.match(str(col))
            if m and pd.notna(value):
                rows.append({**{k: run[k] for k in KEYS}, "length": int(m.group(1)),
                             "task": run["task.name"].split("/", 1)[1], "score": round(float(value), 2)})
    wide = pd.DataFrame(rows).pivot_table(index=[*KEYS, "length"], columns="task", values="score")
    complete = wide.reindex(columns=list(TASKS)).notna().all(axis=1)
    wide["avg_13"] = wide.reindex(columns=list(TASKS)).mean(axis=1).round(2).where(complete)
    return wide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=None, help="results root (default: paths.results, i.e. "
                        "$KVBENCH_RESULTS or results)")
    args = parser.parse_args()
    try:
        print(table(finished_runs(args.results)).to_markdown(floatfmt=".2f"))
    except UsageError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")


if __name__ == "__main__":
    main()

"""The README's real-model RULER tables (``+experiment=real_tiny_ruler``): one block per (model, length, protocol),
one row per (method, budget), one column per task (RULER's score, 0-100) and the mean over the tasks with its 95 %
interval and n.

    python scripts/real_ruler_table.py [--results ROOT]     # default: paths.results (KVBENCH_RESULTS)

The mean pools every question of the row's tasks (each task has the same n per length, so tasks weigh alike); its
interval is the report's cluster bootstrap (:func:`kvbench.report.stats.bootstrap_ci`) over contexts, so questions
that share a context are resampled together. A row is printed only when every task of its block ran on the same
number of questions (``n``); fewer tasks than the block's show as ``-`` and leave the mean empty.
"""

from __future__ import annotations

import argparse

import pandas as pd

from kvbench.report.stats import bootstrap_ci
from kvbench.results import finished_runs

KEYS = ["model.name", "meta.target_length", "protocol"]
ROW = ["method.name", "budget"]
ORDER = ["fullkv", "streamingllm", "snapkv", "pyramidkv", "adakv", "defensivekv"]


def samples(root: str | None) -> pd.DataFrame:
    """Per-question rows of the finished ``ruler/*`` runs (score 0-100)."""
    df = finished_runs(root, samples=True)
    df = df[df["task.name"].astype(str).str.startswith("ruler/")].copy()
    df["task"] = df["task.name"].str.split("/", n=1).str[1]
    df["score"] = df["main_score"].astype(float)  # already 0-100
    return df


def row(grp: pd.DataFrame, tasks: list[str]) -> dict:
    """One (method, budget) row: per-task means, the pooled mean, its clustered 95 % interval and n per task."""
    out = {t: grp.loc[grp["task"] == t, "score"].mean() if (grp["task"] == t).any() else None for t in tasks}
    counts = grp.groupby("task").size()
    complete = set(counts.index) == set(tasks) and counts.nunique() == 1
    lo, hi = bootstrap_ci(grp["score"].to_numpy(), clusters=(grp["task"] + "/" + grp["sample_id"]).to_numpy())
    out["mean [95 % CI]"] = f"{grp['score'].mean():.1f} [{lo:.1f}, {hi:.1f}]" if complete else ""
    out["n"] = int(counts.iloc[0]) if counts.nunique() == 1 else "/".join(map(str, counts))
    return out


def block(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of one (model, length, protocol)."""
    tasks = sorted(df["task"].unique())
    rows = {(m, b): row(g, tasks) for (m, b), g in df.groupby(ROW, sort=False)}
    table = pd.DataFrame.from_dict(rows, orient="index")
    rank = {m: i for i, m in enumerate(ORDER)}
    table = table.loc[sorted(table.index, key=lambda k: (rank.get(k[0], len(ORDER)), float(k[1])))]
    table.index = [f"{m} {b:g}" if m != "fullkv" else "fullkv" for m, b in table.index]
    return table[~table.index.duplicated()]  # fullkv is the same at every budget: one row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=None, help="results root (default: paths.results / KVBENCH_RESULTS)")
    args = ap.parse_args()
    df = samples(args.results)
    for (model, length, protocol), grp in df.groupby(KEYS, sort=True):
        print(f"\n**{model}, {int(length)} tokens, {protocol}**\n")
        print(block(grp).to_markdown(floatfmt=".1f"))


if __name__ == "__main__":
    main()

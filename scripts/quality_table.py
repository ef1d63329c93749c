"""The method x budget x protocol table of the README, measured by kvbench itself on the embedded model and task.

    python scripts/quality_table.py                        # every method, budgets 0.1 0.2 0.5, both protocols
    python scripts/quality_table.py --task synth_needle --budgets 0.2 --protocols query_aware

Each cell is a normal kvbench run (``kvbench.runner.run``) with its own run directory under ``--results`` (default
``paths.results``: ``$KVBENCH_RESULTS`` or ``results``), so a rerun only computes what is missing. Prints a Markdown
table of exactly the methods, budgets and protocols asked for (score = exact match in %, mean over questions; other
runs in the same root are left out) with ``n``, the questions each cell was scored on.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir

from kvbench.errors import UsageError
from kvbench.results import load_results, results_root
from kvbench.runner import run

CONF = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=sorted(f.stem for f in (CONF / "method").glob("*.yaml")))
    p.add_argument("--budgets", nargs="*", type=float, default=[0.1, 0.2, 0.5])
    p.add_argument("--protocols", nargs="*", default=["query_aware", "query_agnostic"])
    p.add_argument("--task", default="synth_multikey")
    p.add_argument("--model", default="kvbench-tiny")
    p.add_argument("--results", default=None, help="results root (default: paths.results, i.e. $KVBENCH_RESULTS "
                   "or results)")
    p.add_argument("--limit", type=int, default=None, help="first N samples of the task (a quick look)")
    args = p.parse_args()
    args.results = str(results_root(args.results))
    for protocol in args.protocols:
        for method in args.methods:
            for budget in [1.0] if method == "fullkv" else args.budgets:
                overrides = [f"method={method}", f"budget={budget}", f"protocol={protocol}", f"task={args.task}",
                             f"model={args.model}", f"paths.results={args.results}", "progress=false",
                             f"limit={'null' if args.limit is None else args.limit}"]
                with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                    cfg = compose("config", overrides=overrides)
                try:
                    with contextlib.redirect_stdout(io.StringIO()):
                        m = run(cfg)
                except UsageError as err:  # a method that refuses this protocol (EpiCache is query-agnostic only)
                    print(f"{protocol:<15}{method:<14}{budget:<6} skipped: {err}", flush=True)
                    continue
                print(f"{protocol:<15}{method:<14}{budget:<6}{m['score']['exact_match']:6.1f}", flush=True)
    print_tables(load_results(args.results), args)


def print_tables(df: pd.DataFrame, args: argparse.Namespace) -> None:
    """One table per protocol: the asked methods x the asked budgets (the reference at its one budget), with n."""
    df = df[(df["task.name"] == args.task) & (df["model.name"] == args.model) & df["method.name"].isin(args.methods)]
    for protocol in args.protocols:
        sub = df[df["protocol"] == protocol]
        comp = sub[(sub["method.name"] != "fullkv") & sub["budget"].isin(args.budgets)]
        table = comp.pivot_table(index="method.name", columns="budget", values="score.exact_match", aggfunc="first")
        table.columns = [f"budget {b:g}" for b in table.columns]
        n = comp.groupby("method.name")["n_questions"].agg(lambda v: "/".join(map(str, sorted(set(map(int, v))))))
        full = sub.loc[(sub["method.name"] == "fullkv") & (sub["budget"] == 1.0)]
        if len(full):
            table.loc["fullkv (reference)"] = full["score.exact_match"].iloc[0]
            n["fullkv (reference)"] = str(int(full["n_questions"].iloc[0]))
        table["n"] = n  # questions per cell: one number per row unless its runs had other limits
        print(f"\n{args.task}, {args.model}, {protocol} (exact match %; n = questions per cell):\n")
        print(table.round(1).to_markdown())


if __name__ == "__main__":
    main()

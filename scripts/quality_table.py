"""The method x budget x protocol table of the README, measured by kvbench itself on the embedded model and task.

    python scripts/quality_table.py                        # every method, budgets 0.1 0.2 0.5, both protocols
    python scripts/quality_table.py --task synth_needle --budgets 0.2 --protocols query_aware

Each cell is a normal kvbench run (``kvbench.runner.run``) with its own run directory under ``--results``, so a
rerun only computes what is missing. Prints a Markdown table (score = exact match in %, mean over questions).
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

from hydra import compose, initialize_config_dir

from kvbench.errors import UsageError
from kvbench.results import load_results
from kvbench.runner import run

CONF = Path(__file__).resolve().parents[1] / "conf"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=sorted(f.stem for f in (CONF / "method").glob("*.yaml")))
    p.add_argument("--budgets", nargs="*", type=float, default=[0.1, 0.2, 0.5])
    p.add_argument("--protocols", nargs="*", default=["query_aware", "query_agnostic"])
    p.add_argument("--task", default="synth_multikey")
    p.add_argument("--model", default="kvbench-tiny")
    p.add_argument("--results", default="results")
    p.add_argument("--limit", type=int, default=None, help="first N samples of the task (a quick look)")
    args = p.parse_args()
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
    df = load_results(args.results)
    df = df[(df["task.name"] == args.task) & (df["model.name"] == args.model)]
    for protocol in args.protocols:
        sub = df[df["protocol"] == protocol]
        comp = sub[sub["method.name"] != "fullkv"]
        table = comp.pivot_table(index="method.name", columns="budget", values="score.exact_match", aggfunc="first")
        full = sub.loc[sub["method.name"] == "fullkv", "score.exact_match"]
        if len(full):
            table.loc["fullkv (reference)"] = full.iloc[0]
        table.columns = [f"budget {b:g}" for b in table.columns]
        print(f"\n{args.task}, {args.model}, {protocol} (exact match %):\n")
        print(table.round(1).to_markdown())


if __name__ == "__main__":
    main()

"""Needle heatmap of one finished run: rows = depth percent, columns = context length, cell = mean score x 100 over
the repeats (the pivot of NeedleBench's summariser and of KV papers' heatmaps), plus the overall mean. Depths are
shown in percent whether the task records percents (NeedleBench) or fractions (synth_needle), by the report's rule
(``kvbench.report.plots.depth_percent``).

    python scripts/needle_heatmap.py RUN_DIR [--metric needlebench_origin] [--png heatmap.png]

``--png`` draws it with matplotlib (red -> amber -> green, 0-100), if matplotlib is installed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from kvbench.errors import UsageError
from kvbench.report.plots import needle_grid, with_depth_percent
from kvbench.results import finished_runs


def heatmap(run_dir: str | Path, metric: str | None = None) -> tuple[pd.DataFrame, float, str]:
    """(depth x length pivot of the metric x 100, overall mean x 100, metric name) of one run directory."""
    df = finished_runs(run_dir, samples=True)
    scores = [c for c in df.columns if c.startswith("scores.")]
    metric = metric or scores[0].split(".", 1)[1]
    if f"scores.{metric}" not in df or "meta.depth" not in df:
        raise UsageError(f"{run_dir} has no per-depth {metric!r} scores (metrics: {[c[7:] for c in scores]})")
    df = with_depth_percent(df.assign(score=100 * df[f"scores.{metric}"].astype(float)))
    pivot = needle_grid(df, value="score")
    pivot.index.name, pivot.columns.name = "depth %", "tokens"
    return pivot, float(df["score"].mean()), metric


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--metric", default=None, help="a metric of the run (default: its first)")
    parser.add_argument("--png", default=None, help="also draw the heatmap into this file")
    args = parser.parse_args()
    try:
        pivot, overall, metric = heatmap(args.run_dir, args.metric)
    except UsageError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(pivot.to_markdown(floatfmt=".1f"))
    print(f"\noverall {metric}: {overall:.2f}")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LinearSegmentedColormap

        cmap = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"])
        fig, ax = plt.subplots(figsize=(1 + 0.6 * pivot.shape[1], 1 + 0.4 * pivot.shape[0]))
        image = ax.imshow(pivot.values, cmap=cmap, vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(pivot.shape[1]), [str(c) for c in pivot.columns])
        ax.set_yticks(range(pivot.shape[0]), [f"{d:g}" for d in pivot.index])
        ax.set_xlabel("Token Limit")
        ax.set_ylabel("Depth Percent")
        ax.set_title(f"{metric}: overall {overall:.1f}")
        fig.colorbar(image)
        fig.savefig(args.png, bbox_inches="tight")


if __name__ == "__main__":
    main()

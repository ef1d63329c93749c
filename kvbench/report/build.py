"""``write_report``: every table and figure of a results root into one directory, and the per-question error view."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from kvbench.errors import UsageError
from kvbench.report.plots import (
    budget_curves,
    budget_kind,
    check_formats,
    needle_heatmaps,
    needle_rows,
    pareto,
    save,
)
from kvbench.report.stats import N_RESAMPLES, SEED, run_intervals
from kvbench.report.tables import (
    CONFIG_KEYS,
    REFERENCE,
    add_labels,
    format_budget,
    paper_table,
    relative_to_full,
    summarize,
    to_markdown,
    write_table,
)
from kvbench.results import finished_runs, load_results, results_root

SAMPLE_VIEW = ["task", "model", "protocol", "label", "budget", "seed", "id", "prediction", "references",
               "main_score", "reference_score"]


def errors(samples: pd.DataFrame, task: str | None = None, method: str | None = None, budget: float | None = None,
           only_wrong: bool = True, reference: str = REFERENCE) -> pd.DataFrame:
    """Per-question view: prediction, references, score, and the full cache's score on the same question.

    ``reference_score`` is the mean score of the ``reference`` runs on that question (same task, model, protocol,
    question id), so ``main_score < reference_score`` marks what compression broke. ``only_wrong`` keeps the
    questions scored below 100.
    """
    df = add_labels(samples)
    ref = df[df["method"] == reference].groupby(["task", "model", "protocol", "id"])["main_score"].mean()
    df = df.join(ref.rename("reference_score"), on=["task", "model", "protocol", "id"])
    for col, want in (("task", task), ("method", method), ("budget", budget)):
        if want is not None:
            df = df[df[col] == want]
    if only_wrong:
        df = df[df["main_score"] < 100]
    meta = sorted(c for c in df.columns if c.startswith("meta.") and df[c].map(_scalar).all())
    return df[SAMPLE_VIEW + meta].sort_values(["task", "label", "budget", "id"]).reset_index(drop=True)


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _stem(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", "_".join(str(p) for p in parts))


def write_report(root: str | Path | None = None, out: str | Path | None = None, tasks: Sequence[str] | None = None,
                 avg_tasks: Sequence[str] | None = None, budgets: Sequence[float] | None = None,
                 formats: Sequence[str] = ("png", "pdf"), reference: str = REFERENCE,
                 n_resamples: int = N_RESAMPLES, seed: int = SEED, logger: Any = None) -> dict[str, Path]:
    """Write the report of ``root`` (default :func:`kvbench.results.results_root`: ``$KVBENCH_RESULTS`` or
    ``results``) into ``out`` (default ``<root>/report``); returns the files by name.

    Files: ``table.{csv,md,tex}`` (paper table), ``summary.csv`` (one row per configuration with CI and % of full
    cache), ``runs.csv`` (one row per run with its bootstrap CI), figures ``curves_*``, ``pareto_memory_*``,
    ``pareto_latency_*``, ``needle_*`` (for tasks with needle meta) in each of ``formats``, and ``index.md``.
    ``logger`` (a :class:`kvbench.loggers.WandbLogger`) also receives the tables and PNG figures.
    """
    check_formats(formats)
    given, root = root, results_root(root)
    out = Path(out) if out else root / "report"
    try:
        runs = finished_runs(given)
    except UsageError as err:
        raise UsageError(f"{err}: nothing to report (see `python -m kvbench.report status {root}`)") from None
    samples = load_results(root, samples=True)
    summary = relative_to_full(summarize(runs, samples, n_resamples, seed), reference)
    table = paper_table(summary, tasks, avg_tasks, budgets, reference)  # bad tasks/budgets fail before any write
    std = paper_table(summary, tasks, avg_tasks, budgets, reference, value="std") \
        if (summary["n_seeds"] > 1).any() else None
    files: dict[str, Path] = {}
    out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out / "summary.csv", index=False)
    per_run = runs[[*CONFIG_KEYS, "seed", "main_metric", "main_score", "run_dir"]].merge(
        run_intervals(samples, n_resamples, seed), on="run_dir", how="left")
    per_run.to_csv(out / "runs.csv", index=False)
    files.update({"summary": out / "summary.csv", "runs": out / "runs.csv"})
    files.update({f"table.{k}": p for k, p in write_table(table, out, "table", std, reference=reference).items()})
    figures, skipped = _figures(summary, samples, out, tasks, formats, reference)
    files.update(figures)
    _index(out, table, std, figures, skipped, reference)
    files["index"] = out / "index.md"
    if logger is not None:
        from kvbench.loggers import _safely

        pngs = {k: p for k, p in figures.items() if p.suffix == ".png"}
        _safely("wandb report logging", logger.log_report, f"report:{Path(root).name}",
                {"table": table, "summary": summary}, pngs)
    return files


def _figures(summary: pd.DataFrame, samples: pd.DataFrame, out: Path, tasks: Sequence[str] | None,
             formats: Sequence[str], reference: str) -> tuple[dict[str, Path], dict[str, str]]:
    """Every figure of the report (files by name) and the figures skipped, with why (a warning each)."""
    files: dict[str, Path] = {}
    skipped: dict[str, str] = {}

    def emit(fig_fn: Any, stem: str, *args: Any, **kwargs: Any) -> None:
        try:
            fig = fig_fn(*args, **kwargs)
        except UsageError as err:  # a figure that would be empty (no method ran every task, ...): skip, say why
            skipped[stem] = str(err)
            warnings.warn(f"{stem}: skipped: {err}", stacklevel=2)
            return
        for path in save(fig, out, stem, formats):
            files[path.name] = path

    for (model, protocol), grp in summary.groupby(["model", "protocol"], sort=True):
        comp = grp[grp["method"] != reference]
        for kind in sorted({budget_kind(b) for b in comp["budget"]}):
            emit(budget_curves, _stem("curves", model, protocol, kind), grp, tasks=tasks, kind=kind,
                 reference=reference)
        emit(pareto, _stem("pareto_memory", model, protocol), grp, x="kv_bytes_kept", tasks=tasks,
             reference=reference)
        emit(pareto, _stem("pareto_latency", model, protocol), grp, x="ttft_s", tasks=tasks, reference=reference)
    needle = needle_rows(samples)
    if not needle.empty:
        for (task, model, protocol), grp in needle.groupby(["task", "model", "protocol"], sort=True):
            for b in sorted(grp.loc[grp["method"] != reference, "budget"].unique()):
                emit(needle_heatmaps, _stem("needle", task, model, protocol, f"budget={format_budget(b)}"), grp,
                     budget=b, reference=reference)
    return files, skipped


def _index(out: Path, table: pd.DataFrame, std: pd.DataFrame | None, figures: dict[str, Path],
           skipped: dict[str, str], reference: str) -> None:
    pngs = sorted(p.name for p in figures.values() if p.suffix == ".png")
    text = ["# kvbench report", "",
            "Scores are the task's main metric (0-100); `n` is the number of questions per run of each task (one",
            "number when the tasks agree, else one per task). Rows run on other questions (another `limit`) are a",
            "separate block with the reference run on the same questions; `Avg.` is the mean over the table's tasks;",
            f"`% of full` = Avg. / Avg. of `{reference}` in the same block x 100. The best compressed value of a",
            "block is bold where the block has two or more different values.", "",
            to_markdown(table, std, reference=reference), "## Figures", ""]
    text += [f"![{name}]({name})" for name in pngs] or ["(none)"]
    if skipped:
        text += ["", "## Figures not drawn", ""]
        text += [f"* `{stem}`: {why}" for stem, why in sorted(skipped.items())]
    (out / "index.md").write_text("\n".join(text) + "\n")

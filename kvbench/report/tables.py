"""Summary and paper-style tables from ``load_results`` frames.

* :func:`summarize`: one row per configuration (task, model, method, allocator, protocol, budget) with the mean
  score over seeds, its std over seeds, a bootstrap interval over questions, and the mean efficiency metrics.
* :func:`relative_to_full`: adds ``pct_of_full`` = score / full-cache score of the same (task, model, protocol) x 100.
* :func:`paper_table`: methods x tasks at each budget, the average column the papers use and "% of full cache",
  with the full cache as the reference row of every budget block.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kvbench.errors import UsageError
from kvbench.report.stats import N_RESAMPLES, SEED, bootstrap_ci
from kvbench.report.style import method_order, sort_key
from kvbench.schema import EFFICIENCY_KEYS

CONFIG_KEYS = ["task", "model", "method", "allocator", "protocol", "budget"]
#: Efficiency columns of metrics.json averaged over seeds in the summary (present ones only), from the schema.
EFFICIENCY = list(EFFICIENCY_KEYS)
REFERENCE = "fullkv"
AVG, PCT = "Avg.", "% of full"


def add_labels(df: pd.DataFrame) -> pd.DataFrame:
    """A ``label`` column: the method name, or ``"method (allocator)"`` where a method ran with several allocators."""
    df = df.copy()
    n_alloc = df.groupby("method")["allocator"].nunique()
    pairs = zip(df["method"], df["allocator"], strict=True)
    df["label"] = [m if n_alloc.get(m, 1) <= 1 else f"{m} ({a})" for m, a in pairs]
    return df


def summarize(runs: pd.DataFrame, samples: pd.DataFrame | None = None, n_resamples: int = N_RESAMPLES,
              seed: int = SEED) -> pd.DataFrame:
    """One row per configuration over its seeds.

    Columns: the configuration keys, ``label``, ``main_metric``, ``score`` (mean over seeds of the run scores),
    ``std`` (sample std over seeds; NaN for one seed), ``n_seeds``, the mean of each efficiency column, and with
    ``samples`` also ``n_questions``, ``ci_low``, ``ci_high``: the percentile bootstrap interval of the mean over all
    questions of the configuration (all seeds pooled; :mod:`kvbench.report.stats`).
    """
    if runs.empty:
        raise UsageError("no finished runs to summarise (no metrics.json under the results root)")
    df = add_labels(runs)
    keys = [*CONFIG_KEYS, "label", "main_metric"]
    agg = {"score": ("main_score", "mean"), "std": ("main_score", "std"), "n_seeds": ("seed", "nunique")}
    agg.update({c: (c, "mean") for c in EFFICIENCY if c in df})
    out = df.groupby(keys, dropna=False, sort=False).agg(**agg).reset_index()
    if samples is not None and not samples.empty:
        ci = []
        for key, grp in samples.groupby(CONFIG_KEYS, dropna=False, sort=False):
            lo, hi = bootstrap_ci(grp["main_score"].to_numpy(), n_resamples, seed)
            ci.append({**dict(zip(CONFIG_KEYS, key, strict=True)), "n_questions": len(grp), "ci_low": lo,
                       "ci_high": hi})
        out = out.merge(pd.DataFrame(ci), on=CONFIG_KEYS, how="left")
    order = out["label"].map(sort_key)
    return out.assign(_o=order).sort_values(["task", "model", "protocol", "_o", "budget"]).drop(columns="_o") \
        .reset_index(drop=True)


def relative_to_full(summary: pd.DataFrame, reference: str = REFERENCE) -> pd.DataFrame:
    """Adds ``reference_score`` and ``pct_of_full`` = 100 x score / reference score of the same (task, model,
    protocol); the reference is the mean over its runs there (any budget, allocator, seed)."""
    ref = summary[summary["method"] == reference].groupby(["task", "model", "protocol"])["score"].mean()
    out = summary.join(ref.rename("reference_score"), on=["task", "model", "protocol"])
    out["pct_of_full"] = 100 * out["score"] / out["reference_score"]
    return out


def _check_tasks(summary: pd.DataFrame, tasks: Sequence[str] | None, avg_tasks: Sequence[str] | None
                 ) -> tuple[list[str], list[str]]:
    present = list(dict.fromkeys(summary["task"]))
    tasks = list(tasks) if tasks else sorted(present)
    missing = [t for t in tasks if t not in present]
    if missing:
        raise UsageError(f"tasks {missing} have no finished runs; present: {sorted(present)}")
    avg_tasks = list(avg_tasks) if avg_tasks else tasks
    if not set(avg_tasks) <= set(tasks):
        raise UsageError(f"average tasks {sorted(set(avg_tasks) - set(tasks))} are not in the table's tasks {tasks}")
    return tasks, avg_tasks


def paper_table(summary: pd.DataFrame, tasks: Sequence[str] | None = None, avg_tasks: Sequence[str] | None = None,
                budgets: Sequence[float] | None = None, reference: str = REFERENCE, value: str = "score"
                ) -> pd.DataFrame:
    """Methods x tasks at each budget: index (model, protocol, budget, method), columns tasks + Avg. + % of full.

    ``Avg.`` is the mean over ``avg_tasks`` (default: every task of the table; NaN if one is missing for a row), as
    in the papers' average column. ``% of full`` = 100 x Avg. / Avg. of the reference row. Every budget block starts
    with the reference (full cache) row, averaged over its runs of that (model, protocol). ``value="std"`` gives the
    same layout with the std over seeds (Avg. and % of full are then NaN).
    """
    tasks, avg_tasks = _check_tasks(summary, tasks, avg_tasks)
    s = summary[summary["task"].isin(tasks)]
    comp, ref = s[s["method"] != reference], s[s["method"] == reference]
    missing = sorted(set(budgets or []) - set(comp["budget"]))
    if missing:
        present = sorted(map(float, comp["budget"].unique()))
        raise UsageError(f"budgets {missing} have no finished runs; present: {present}")
    blocks = []
    for model, protocol in s[["model", "protocol"]].drop_duplicates().sort_values(["model", "protocol"]).itertuples(
            index=False):
        ref_row = ref[(ref["model"] == model) & (ref["protocol"] == protocol)].groupby("task")[value].mean()
        cgrp = comp[(comp["model"] == model) & (comp["protocol"] == protocol)]
        block_budgets = sorted(cgrp["budget"].unique()) if budgets is None else list(budgets)
        for b in block_budgets or [np.nan]:
            wide = cgrp[cgrp["budget"] == b].pivot_table(index="label", columns="task", values=value, aggfunc="mean")
            if not ref_row.empty:
                wide = pd.concat([ref_row.rename(reference).to_frame().T, wide])
            if wide.empty:
                continue
            wide = wide.reindex(index=method_order(wide.index), columns=tasks)
            avg = wide[avg_tasks].mean(axis=1, skipna=False) if value == "score" else np.nan
            wide[AVG] = avg
            wide[PCT] = 100 * wide[AVG] / wide[AVG].get(reference, np.nan) if value == "score" else np.nan
            wide.index = pd.MultiIndex.from_tuples([(model, protocol, b, m) for m in wide.index],
                                                   names=["model", "protocol", "budget", "method"])
            blocks.append(wide)
    if not blocks:
        raise UsageError("nothing to tabulate for the requested tasks/budgets")
    table = pd.concat(blocks)
    table.columns.name = None
    return table


def format_budget(b: float) -> str:
    """0.2 -> '0.2'; 128.0 -> '128' (tokens per KV head)."""
    if b != b:  # NaN
        return "-"
    return f"{b:g}"


def _cells(table: pd.DataFrame, std: pd.DataFrame | None, decimals: int, bold: str | None, reference: str
           ) -> pd.DataFrame:
    """String cells: value (+- std where several seeds), best compressed value per budget block in bold."""
    def fmt(v: float) -> str:
        return "-" if pd.isna(v) else f"{v:.{decimals}f}"

    out = table.map(fmt).astype(object)
    if std is not None:
        sd = std.reindex_like(table)
        for col in table.columns:
            mask = sd[col].notna()
            pairs = zip(table.loc[mask, col], sd.loc[mask, col], strict=True)
            out.loc[mask, col] = [f"{fmt(v)} ± {fmt(e)}" for v, e in pairs]
    if bold:
        for _, block in table.groupby(level=["model", "protocol", "budget"], dropna=False):
            rows = block[block.index.get_level_values("method") != reference]
            for col in table.columns:
                if rows[col].notna().any():
                    best = rows[col].max()
                    for idx in rows.index[rows[col] == best]:
                        out.loc[idx, col] = bold.format(out.loc[idx, col])
    return out


def to_markdown(table: pd.DataFrame, std: pd.DataFrame | None = None, decimals: int = 1,
                reference: str = REFERENCE) -> str:
    """One Markdown table per (model, protocol); the best compressed value of each budget block in bold."""
    cells = _cells(table, std, decimals, "**{}**", reference)
    parts = []
    for (model, protocol), block in cells.groupby(level=["model", "protocol"], sort=False):
        body = block.droplevel(["model", "protocol"]).reset_index()
        body["budget"] = body["budget"].map(format_budget)
        parts.append(f"### {model} | {protocol}\n\n" + body.to_markdown(index=False, stralign="right") + "\n")
    return "\n".join(parts)


def to_latex(table: pd.DataFrame, std: pd.DataFrame | None = None, decimals: int = 1,
             reference: str = REFERENCE) -> str:
    """A booktabs LaTeX table per (model, protocol) (needs ``\\usepackage{booktabs}``), best values in bold."""
    cells = _cells(table, std, decimals, "\\textbf{{{}}}", reference).map(lambda c: c.replace("±", "$\\pm$"))
    parts = []
    for (model, protocol), block in cells.groupby(level=["model", "protocol"], sort=False):
        body = block.droplevel(["model", "protocol"])
        body.index = body.index.set_levels([format_budget(b) for b in body.index.levels[0]], level="budget")
        body.columns = [str(c).replace("_", "\\_").replace("%", "\\%") for c in body.columns]
        body.index = body.index.set_levels([m.replace("_", "\\_") for m in body.index.levels[1]], level="method")
        latex = body.to_latex(escape=False, multirow=True, column_format="ll" + "r" * body.shape[1])
        parts.append(f"% {model} | {protocol}\n{latex}")
    return "\n".join(parts)


def write_table(table: pd.DataFrame, out_dir: str | Path, stem: str = "table", std: pd.DataFrame | None = None,
                decimals: int = 1, reference: str = REFERENCE) -> dict[str, Path]:
    """``<stem>.csv`` (full precision), ``<stem>.md`` and ``<stem>.tex``; returns the paths by format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md", "tex": out / f"{stem}.tex"}
    table.to_csv(paths["csv"])
    paths["md"].write_text(to_markdown(table, std, decimals, reference))
    paths["tex"].write_text(to_latex(table, std, decimals, reference))
    return paths

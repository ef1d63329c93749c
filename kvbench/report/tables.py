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
from kvbench.report.stats import CLUSTER, N_RESAMPLES, SEED, question_ci
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
    """One row per configuration and sample set over its seeds.

    Columns: the configuration keys, ``n`` (questions per run: the sample set; seeds of one configuration run on
    different sample sets, e.g. ``limit=8`` and all 32 questions, stay separate rows), ``label``, ``main_metric``,
    ``score`` (mean over seeds of the run scores), ``std`` (sample std over seeds; NaN for one seed), ``n_seeds``,
    the mean of each efficiency column, and with ``samples`` also ``n_questions`` and ``n_contexts`` (all seeds
    pooled), ``ci_low``, ``ci_high``: the percentile bootstrap interval of the mean over those questions, resampling
    contexts (:mod:`kvbench.report.stats`).
    """
    if runs.empty:
        raise UsageError("no finished runs to summarise (no metrics.json under the results root)")
    df = add_labels(runs).assign(n=_run_sizes(runs, samples))
    keys = [*CONFIG_KEYS, "n", "label", "main_metric"]
    agg = {"score": ("main_score", "mean"), "std": ("main_score", "std"), "n_seeds": ("seed", "nunique")}
    agg.update({c: (c, "mean") for c in EFFICIENCY if c in df})
    out = df.groupby(keys, dropna=False, sort=False).agg(**agg).reset_index()
    if samples is not None and not samples.empty:
        sized = samples.join(df.set_index("run_dir")["n"], on="run_dir")
        ci = []
        for key, grp in sized.groupby([*CONFIG_KEYS, "n"], dropna=False, sort=False):
            lo, hi = question_ci(grp, n_resamples, seed)
            n_ctx = grp[CLUSTER].nunique() if CLUSTER in grp else len(grp)
            ci.append({**dict(zip([*CONFIG_KEYS, "n"], key, strict=True)), "n_questions": len(grp),
                       "n_contexts": n_ctx, "ci_low": lo, "ci_high": hi})
        out = out.merge(pd.DataFrame(ci), on=[*CONFIG_KEYS, "n"], how="left")
    order = out["label"].map(sort_key)
    return out.assign(_o=order).sort_values(["task", "model", "protocol", "_o", "budget", "n"]) \
        .drop(columns="_o").reset_index(drop=True)


def _run_sizes(runs: pd.DataFrame, samples: pd.DataFrame | None) -> pd.Series:
    """Questions per run: metrics.json's ``n_questions``, else the run's per-question rows."""
    if "n_questions" in runs and runs["n_questions"].notna().all():
        return runs["n_questions"].astype(int)
    if samples is not None and not samples.empty:
        return runs["run_dir"].map(samples.groupby("run_dir").size()).astype("Int64")
    return pd.Series(pd.NA, index=runs.index, dtype="Int64")


def relative_to_full(summary: pd.DataFrame, reference: str = REFERENCE) -> pd.DataFrame:
    """Adds ``reference_score`` and ``pct_of_full`` = 100 x score / reference score of the same (task, model,
    protocol) on the same sample set (``n``); the reference is the mean over its runs there (any budget,
    allocator, seed). NaN where the reference did not run on those questions."""
    keys = ["task", "model", "protocol", "n"]
    ref = summary[summary["method"] == reference].groupby(keys, dropna=False)["score"].mean()
    out = summary.join(ref.rename("reference_score"), on=keys)
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
    """Methods x tasks at each budget: index (model, protocol, budget, n, method), columns tasks + Avg. + % of full.

    ``n`` is the rows' sample set: questions per run of each task (one number when the tasks agree, else one per
    task, ``/``-separated in column order). Rows of one budget that ran on other sample sets (``limit=8`` next to
    all 32 questions) form separate blocks, each with the reference row of its own sample set, so no cell is
    compared with, or averaged against, a score of other questions. A configuration whose seeds ran on different
    sample sets is refused (rerun them with the same ``limit``). ``Avg.`` is the mean over ``avg_tasks`` (default:
    every task of the table; NaN if one is missing for a row), as in the papers' average column. ``% of full`` =
    100 x Avg. / Avg. of the block's reference row. ``value="std"`` gives the same layout with the std over seeds
    (Avg. and % of full are then NaN).
    """
    tasks, avg_tasks = _check_tasks(summary, tasks, avg_tasks)
    s = summary[summary["task"].isin(tasks)]
    comp, ref = s[s["method"] != reference], s[s["method"] == reference]
    missing = sorted(set(budgets or []) - set(comp["budget"]))
    if missing:
        present = sorted(map(float, comp["budget"].unique()))
        raise UsageError(f"budgets {missing} have no finished runs; present: {present}")
    _refuse_mixed_seeds(s)
    blocks = []
    for model, protocol in s[["model", "protocol"]].drop_duplicates().sort_values(["model", "protocol"]).itertuples(
            index=False):
        ref_cells = ref[(ref["model"] == model) & (ref["protocol"] == protocol)]
        cgrp = comp[(comp["model"] == model) & (comp["protocol"] == protocol)]
        block_budgets = sorted(cgrp["budget"].unique()) if budgets is None else list(budgets)
        for b in block_budgets or [np.nan]:
            for sizes, labels in _sample_sets(cgrp[cgrp["budget"] == b], ref_cells, tasks):
                wide = _block(cgrp[(cgrp["budget"] == b) & cgrp["label"].isin(labels)], ref_cells, sizes, tasks,
                              avg_tasks, reference, value)
                if wide is not None:
                    n = _sizes_text(sizes, tasks)
                    wide.index = pd.MultiIndex.from_tuples([(model, protocol, b, n, m) for m in wide.index],
                                                           names=["model", "protocol", "budget", "n", "method"])
                    blocks.append(wide)
    if not blocks:
        raise UsageError("nothing to tabulate for the requested tasks/budgets")
    table = pd.concat(blocks)
    table.columns.name = None
    return table


def _refuse_mixed_seeds(s: pd.DataFrame) -> None:
    """One configuration (over its seeds) must have one sample set: its score is a mean over those seeds."""
    sets = s.groupby(["task", "model", "protocol", "budget", "label"], dropna=False)["n"].nunique()
    mixed = sets[sets > 1]
    if not mixed.empty:
        task, model, protocol, budget, label = mixed.index[0]
        sizes = sorted(s[(s["task"] == task) & (s["label"] == label) & (s["budget"] == budget)]["n"].tolist())
        raise UsageError(f"{label} at budget {format_budget(budget)} on {task} ({model}, {protocol}) has seeds run "
                         f"on different sample sets (n = {sizes} questions); its mean over seeds would mix them. "
                         "Rerun those seeds with the same limit, or pass --tasks/--budgets without it.")


def _sample_sets(rows: pd.DataFrame, ref: pd.DataFrame, tasks: list[str]
                 ) -> list[tuple[dict[str, int], list[str]]]:
    """The block's labels grouped by sample set ({task: n}); a label missing a task fits any set. Without
    compressed rows (no ``budget``): the reference's own sample sets."""
    source = rows if not rows.empty else ref
    groups: list[tuple[dict[str, int], list[str]]] = []
    for label, cells in source.groupby("label", sort=False):
        sizes = dict(zip(cells["task"], cells["n"], strict=True))
        for known, labels in groups:
            if all(known.get(t, n) == n for t, n in sizes.items()):
                known.update(sizes)
                labels.append(label)
                break
        else:
            groups.append((sizes, [label]))
    return sorted(groups, key=lambda g: -max((n for n in g[0].values() if pd.notna(n)), default=0))  # most first


def _block(rows: pd.DataFrame, ref: pd.DataFrame, sizes: dict[str, int], tasks: list[str], avg_tasks: list[str],
           reference: str, value: str) -> pd.DataFrame | None:
    """One budget block on one sample set: the reference row (its runs on the same questions), then the methods."""
    wide = rows.pivot_table(index="label", columns="task", values=value, aggfunc="mean")
    same = ref[pd.Series([sizes.get(t) == n for t, n in zip(ref["task"], ref["n"], strict=True)], index=ref.index,
                         dtype=bool)]  # the reference's runs on the same questions (none: no reference row)
    ref_row = same.groupby("task")[value].mean()
    if not ref_row.empty:
        wide = pd.concat([ref_row.rename(reference).to_frame().T, wide])
    if wide.empty:
        return None
    wide = wide.reindex(index=method_order(wide.index), columns=tasks)
    wide[AVG] = wide[avg_tasks].mean(axis=1, skipna=False) if value == "score" else np.nan
    wide[PCT] = 100 * wide[AVG] / wide[AVG].get(reference, np.nan) if value == "score" else np.nan
    return wide


def _sizes_text(sizes: dict[str, int], tasks: list[str]) -> str:
    """``"32"`` when the tasks agree, else ``"8/32"`` (per task in column order, ``-`` where absent)."""
    present = {int(n) for n in sizes.values() if pd.notna(n)}
    if len(present) <= 1:
        return str(present.pop()) if present else "-"
    return "/".join(str(int(sizes[t])) if pd.notna(sizes.get(t, np.nan)) else "-" for t in tasks)


def format_budget(b: float) -> str:
    """0.2 -> '0.2'; 128.0 -> '128' (tokens per KV head)."""
    if b != b:  # NaN
        return "-"
    return f"{b:g}"


def _cells(table: pd.DataFrame, std: pd.DataFrame | None, decimals: int, bold: str | None, reference: str
           ) -> pd.DataFrame:
    """String cells: value (+- std where several seeds), the best compressed value per budget block (and sample
    set) in bold; nothing is bold where the block has one compressed value or all are equal."""
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
        for _, block in table.groupby(level=["model", "protocol", "budget", "n"], dropna=False):
            rows = block[block.index.get_level_values("method") != reference]
            for col in table.columns:
                values = rows[col].dropna()
                if values.nunique() > 1:  # a best needs at least two different values to be best among
                    best = values.max()
                    for idx in rows.index[rows[col] == best]:
                        out.loc[idx, col] = bold.format(out.loc[idx, col])
    return out


def to_markdown(table: pd.DataFrame, std: pd.DataFrame | None = None, decimals: int = 1,
                reference: str = REFERENCE) -> str:
    """One Markdown table per (model, protocol), with the ``n`` (questions) column; best compressed values bold."""
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
        budgets, methods = body.index.levels[0], body.index.levels[body.index.names.index("method")]
        body.index = body.index.set_levels([format_budget(b) for b in budgets], level="budget")
        body.index = body.index.set_levels([m.replace("_", "\\_") for m in methods], level="method")
        body.columns = [str(c).replace("_", "\\_").replace("%", "\\%") for c in body.columns]
        latex = body.to_latex(escape=False, multirow=True, column_format="l" * body.index.nlevels + "r" * body.shape[1])
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

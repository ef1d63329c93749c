"""Figures from the summary / per-sample frames: score-vs-budget curves, needle heatmaps, Pareto plots.

Every figure is a ``matplotlib.figure.Figure`` built without pyplot (no GUI backend; notebooks display it), with
labelled axes, a legend, and methods in the fixed colours and order of :mod:`kvbench.report.style`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.ticker import FuncFormatter, NullFormatter, NullLocator

from kvbench.errors import UsageError
from kvbench.report.style import method_color, method_marker, method_order
from kvbench.report.tables import REFERENCE, format_budget

#: x axes of the Pareto plots: column -> (axis label, scale factor from the stored unit).
RESOURCES: dict[str, tuple[str, float]] = {
    "kv_bytes_kept": ("KV cache after compression (MiB)", 2.0**-20),
    "peak_kv_bytes": ("peak KV cache (MiB)", 2.0**-20),
    "peak_mem_bytes": ("peak accelerator memory (MiB)", 2.0**-20),
    "ttft_s": ("time to first token: prefill + compression (ms)", 1000.0),
    "decode_s_per_token": ("decode time per token (ms)", 1000.0),
}


def budget_kind(budget: float) -> str:
    """``fraction`` (budget <= 1: share of the KV cache kept) or ``tokens`` (average tokens per KV head)."""
    return "fraction" if budget <= 1 else "tokens"


#: y range of every score axis: 0-100 with room for points at 0 and 100 (not cut in half by the frame).
SCORE_LIM = (-3.0, 105.0)
BUDGET_AXIS = {"fraction": "KV budget (fraction of the cache kept)", "tokens": "KV budget (tokens per KV head)"}


def select(df: pd.DataFrame, model: str | None = None, protocol: str | None = None) -> tuple[pd.DataFrame, str, str]:
    """Rows of one (model, protocol); each may be omitted when the frame holds only one."""
    chosen = []
    for col, want in (("model", model), ("protocol", protocol)):
        values = sorted(df[col].dropna().unique())
        if want is None:
            if len(values) != 1:
                raise UsageError(f"the results hold several {col}s {values}; pass {col}=...")
            want = values[0]
        elif want not in values:
            raise UsageError(f"{col}={want!r} has no results; present: {values}")
        df = df[df[col] == want]
        chosen.append(want)
    return df, chosen[0], chosen[1]


MIN_WIDTH = 7.0  # inches: room for the two-line suptitle and the legend beside a single panel


def _grid(n: int, ncols: int, size: tuple[float, float]) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(max(MIN_WIDTH, size[0] * ncols + 1.5), size[1] * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def largest_sample_sets(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (task, label, budget): the one on the most questions where a configuration ran on several
    sample sets (``limit=8`` and all questions); figures draw one point per configuration."""
    if "n" not in df or df["n"].isna().all():
        return df
    order = df.assign(_n=df["n"].astype(float).fillna(-1)).sort_values("_n", ascending=False, kind="stable")
    keys = [k for k in ("task", "model", "protocol", "label", "budget") if k in df]
    return order.drop_duplicates(keys).drop(columns="_n").sort_index()


def sample_note(df: pd.DataFrame) -> str:
    """What the points were scored on: ``n = 8 questions per task`` (or per task where tasks differ), or a warning
    where the methods of one task ran on different questions (``limit=8`` next to all 32)."""
    if "n" not in df or df["n"].isna().all():
        return ""
    sizes = df.dropna(subset=["n"]).groupby("task")["n"].agg(lambda v: sorted({int(n) for n in v}))
    mixed = {t: n for t, n in sizes.items() if len(n) > 1}
    if mixed:
        task, n = next(iter(mixed.items()))
        return f"n differs between methods on {task} ({', '.join(map(str, n))} questions): see the table's n column"
    per_task = {t: n[0] for t, n in sizes.items()}
    if len(set(per_task.values())) == 1:
        return f"n = {next(iter(per_task.values()))} questions per task"
    return "n = " + ", ".join(f"{t} {n}" for t, n in per_task.items()) + " questions"


def budget_curves(summary: pd.DataFrame, tasks: Sequence[str] | None = None, model: str | None = None,
                  protocol: str | None = None, kind: str | None = None, reference: str = REFERENCE,
                  ncols: int = 3) -> Figure:
    """Score vs budget, one panel per task with compressed runs, one line per method; the full cache dashed.

    Error bars, per point: std over seeds where several seeds ran, else the bootstrap interval
    (``ci_low``/``ci_high``) when the summary has one. ``kind`` picks fraction (<= 1) or token (> 1) budgets
    when both are present. The x ticks are the budgets that ran (log scale when they span 8x or more); a task
    without compressed runs of that kind gets no panel, and a figure without any is refused (UsageError).
    """
    df, model, protocol = select(largest_sample_sets(summary), model, protocol)
    comp = df[df["method"] != reference]
    kinds = sorted({budget_kind(b) for b in comp["budget"]})
    kind = kind or (kinds[0] if len(kinds) == 1 else None)
    if kind is None:
        raise UsageError(f"both fraction and token budgets are present; pass kind= one of {kinds}")
    comp = comp[comp["budget"].map(budget_kind) == kind]
    wanted = list(tasks) if tasks else sorted(df["task"].unique())
    tasks = [t for t in wanted if (comp["task"] == t).any()]
    if not tasks:
        raise UsageError(f"no compressed runs with {kind} budgets on {wanted} ({model}, {protocol})")
    fig, axes = _grid(len(tasks), ncols, (4.2, 3.4))
    for ax, task in zip(axes, tasks, strict=True):
        rows = comp[comp["task"] == task]
        for label in method_order(rows["label"]):
            _curve(ax, rows[rows["label"] == label].sort_values("budget"), label)
        ref = df[(df["task"] == task) & (df["method"] == reference)]["score"]
        if not ref.empty:
            ax.axhline(ref.mean(), color=method_color(reference), linestyle="--", linewidth=1.2,
                       label=f"{reference} (full cache)")
        budget_axis(ax, sorted(rows["budget"].unique()))
        metric = df[df["task"] == task]["main_metric"].iloc[0]
        ax.set(xlabel=BUDGET_AXIS[kind], ylabel=f"{metric} (%)", ylim=SCORE_LIM)
        ax.set_title(_wrap(task), fontsize=10)
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    note = sample_note(comp)
    fig.suptitle(f"score vs KV budget | {model} | {protocol}\n"
                 "bars: ± std over seeds, or (one seed) 95 % bootstrap interval over contexts"
                 + (f"\n{note}" if note else ""), fontsize=9)
    return fig


def _curve(ax: Axes, r: pd.DataFrame, label: str) -> None:
    """One method's line with its error bars."""
    ax.plot(r["budget"], r["score"], marker=method_marker(label), color=method_color(label), label=label)
    lo, hi = _band(r)
    if lo.notna().any():
        # a percentile interval need not contain the mean (skewed resamples): never a negative bar
        yerr = [(r["score"] - lo).fillna(0).clip(lower=0).to_numpy(), (hi - r["score"]).fillna(0).clip(lower=0)
                .to_numpy()]
        ax.errorbar(r["budget"], r["score"], yerr=yerr, fmt="none", ecolor=method_color(label), capsize=3,
                    alpha=0.6, linewidth=1)


def budget_axis(ax: Axes, budgets: list[float]) -> None:
    """Ticks at the budgets that ran, no minor tick labels: log scale when they span 8x or more; one budget gets
    a range of half to one and a half times it (not matplotlib's +-0.01 around a single point)."""
    lo, hi = min(budgets), max(budgets)
    if hi / lo >= 8:
        ax.set_xscale("log")
        ax.set_xlim(lo / 1.3, hi * 1.3)
    elif lo == hi:
        ax.set_xlim(lo * 0.5, lo * 1.5)
    ax.set_xticks(budgets, [format_budget(b) for b in budgets], rotation=45 if len(budgets) > 5 else 0)
    ax.xaxis.set_minor_locator(NullLocator())


def resource_axis(ax: Axes, values: pd.Series) -> None:
    """Log scale when the resource spans 8x or more (budgets 0.02 ... 0.5 stay apart), ticks in plain numbers."""
    lo, hi = float(values.min()), float(values.max())
    if lo > 0 and hi / lo >= 8:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())


def _wrap(text: str, width: int = 34) -> str:
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)) or text


def _band(r: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per point: score +- std over seeds where several seeds ran, else the bootstrap interval (if computed)."""
    multi = r["n_seeds"] > 1
    lo = (r["score"] - r["std"]).where(multi, r.get("ci_low", np.nan))
    hi = (r["score"] + r["std"]).where(multi, r.get("ci_high", np.nan))
    return lo.clip(lower=0), hi


def _legend(fig: Figure, axes: list) -> None:
    """One legend for the figure, entries in method order (full cache last)."""
    handles: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="outside right center", frameon=False)


def needle_rows(samples: pd.DataFrame) -> pd.DataFrame:
    """Questions of needle tasks with a (length, depth) cell: meta ``kind == "needle"`` (the synthetic suite) or a
    task named ``*needle*`` / ``*niah*``, with meta ``target_length`` and ``depth``."""
    need = ["meta.target_length", "meta.depth"]
    if not set(need) <= set(samples.columns):
        return samples.iloc[0:0]
    is_needle = samples["task"].str.contains("needle|niah", case=False, regex=True)
    if "meta.kind" in samples:
        is_needle |= samples["meta.kind"] == "needle"
    return samples[is_needle].dropna(subset=need)


def depth_percent(depths: pd.Series) -> pd.Series:
    """Needle depths in percent of the context: the synthetic suite records fractions in [0, 1], NeedleBench and
    RULER-style tasks percents in [0, 100]. The unit is read per task from its depths: any depth above 1 means
    percents (left as they are), else fractions (x 100). (A percent grid whose depths all lie in [0, 1] would be
    misread; no benchmark uses one.)"""
    values = depths.astype(float)
    return values if values.max() > 1 else 100 * values


def with_depth_percent(rows: pd.DataFrame) -> pd.DataFrame:
    """Needle rows (of one task) with a ``depth_pct`` column: :func:`depth_percent` of ``meta.depth``."""
    return rows.assign(depth_pct=depth_percent(rows["meta.depth"]))


def needle_grid(rows: pd.DataFrame, value: str = "main_score") -> pd.DataFrame:
    """Mean ``value`` per (needle depth %, context length) of rows with ``depth_pct`` (:func:`with_depth_percent`)."""
    return rows.pivot_table(index="depth_pct", columns="meta.target_length", values=value, aggfunc="mean")


def needle_heatmaps(samples: pd.DataFrame, budget: float, task: str | None = None, model: str | None = None,
                    protocol: str | None = None, reference: str = REFERENCE, ncols: int = 4) -> Figure:
    """Needle retrieval per (context length x needle depth), one panel per method at ``budget`` (plus the full cache).

    Uses the per-question meta ``target_length`` and ``depth`` (a fraction, as the synthetic needle task records
    it, or a percent, as NeedleBench does: :func:`depth_percent`); cells are the mean score (0-100) over the
    questions of that cell and all seeds.
    """
    df = needle_rows(samples)
    if df.empty:
        raise UsageError("needle heatmaps need needle questions with meta target_length and depth (task=synth_needle)")
    tasks = sorted(df["task"].unique())
    task = task or (tasks[0] if len(tasks) == 1 else None)
    if task not in tasks:
        raise UsageError(f"pass task= one of the needle tasks {tasks}")
    df, model, protocol = select(df[df["task"] == task], model, protocol)
    if "label" not in df:
        from kvbench.report.tables import add_labels

        df = add_labels(df)
    df = with_depth_percent(df)  # the task's unit, read over all its rows
    df = df[(df["budget"] == budget) | (df["method"] == reference)]
    labels = method_order(df["label"])
    if not labels or set(df["method"]) == {reference}:
        raise UsageError(f"no compressed {task} results at budget {format_budget(budget)}")
    fig, axes = _grid(len(labels), ncols, (3.4, 3.2))
    image = None
    for ax, label in zip(axes, labels, strict=True):
        image = _heatmap(ax, needle_grid(df[df["label"] == label]))
        title = label if label.split(" (")[0] != reference else f"{label} (full cache)"
        mean = df.loc[df["label"] == label, "main_score"].mean()
        ax.set_title(_wrap(f"{title}: {mean:.1f}", 28), fontsize=10)
    fig.colorbar(image, ax=axes, label="score (%)", shrink=0.9)
    n = sorted(set(df.groupby("label")["id"].nunique()))  # distinct questions (seeds and reference budgets pooled)
    fig.suptitle(f"{task} | {model} | {protocol} | budget {format_budget(budget)}\n"
                 f"cells: mean score of the cell's questions (n = {'/'.join(map(str, n))} questions per method)",
                 fontsize=10)
    return fig


def _heatmap(ax: Axes, grid: pd.DataFrame) -> AxesImage:
    """Draw one depth x length grid (rows: depth %, columns: tokens) with its cell values."""
    image = ax.imshow(grid.to_numpy(), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(grid.shape[1]), [str(int(c)) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [f"{d:g}" for d in grid.index])
    if grid.size <= 400:
        for (i, j), v in np.ndenumerate(grid.to_numpy()):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 20 or v > 80 else "black")  # readable on the dark ends
    ax.set(xlabel="context length (tokens)", ylabel="needle depth (%)")
    return image


def _resource(df: pd.DataFrame, x: str) -> pd.Series:
    if x == "ttft_s":
        parts = [c for c in ("prefill_s", "compress_s", "question_s") if c in df]
        return df[parts].fillna(0).sum(axis=1) if parts else pd.Series(np.nan, index=df.index)
    if x not in df:
        raise UsageError(f"no column {x!r} in the summary; Pareto axes: {sorted(RESOURCES)}")
    return df[x]


def pareto_front(points: pd.DataFrame, x: str = "x", y: str = "score") -> pd.DataFrame:
    """The non-dominated points (lower ``x``, higher ``y``), sorted by ``x``."""
    pts = points.dropna(subset=[x, y]).sort_values([x, y], ascending=[True, False])
    keep, best = [], -np.inf
    for idx, val in pts[y].items():
        if val > best:
            keep.append(idx)
            best = val
    return pts.loc[keep]


def pareto(summary: pd.DataFrame, x: str = "kv_bytes_kept", tasks: Sequence[str] | None = None,
           model: str | None = None, protocol: str | None = None, reference: str = REFERENCE) -> Figure:
    """Average score over ``tasks`` vs a resource (memory or latency, :data:`RESOURCES`), one point per (method,
    budget) that ran every task, each method's points joined, and the Pareto frontier over all points (lower cost,
    higher score). Refused (UsageError, saying why) when no compressed configuration ran every task or the
    resource was not measured, rather than drawn as empty axes."""
    df, model, protocol = select(largest_sample_sets(summary), model, protocol)
    tasks = list(tasks) if tasks else sorted(df["task"].unique())
    df = df[df["task"].isin(tasks)].assign(x=lambda d: _resource(d, x) * RESOURCES.get(x, ("", 1.0))[1])
    pts = df.dropna(subset=["x", "score"]).groupby(["label", "method", "budget"], as_index=False).agg(
        score=("score", "mean"), x=("x", "mean"), n_tasks=("task", "nunique"))
    pts = pts[pts["n_tasks"] == len(tasks)]  # only configurations that ran every task
    if (pts["method"] != reference).sum() == 0:
        why = "was not measured" if df["x"].isna().all() else f"has no compressed configuration that ran all of {tasks}"
        raise UsageError(f"{x} {why} ({model}, {protocol}); pass tasks= a subset the methods share")
    if len(pts) < 2:
        only = f"{pts['label'].iloc[0]} {format_budget(pts['budget'].iloc[0])}"
        raise UsageError(f"only {only} ran all of {tasks} ({model}, {protocol}): one point, no trade-off to plot")
    if pts["x"].nunique() < 2:
        raise UsageError(f"every configuration has the same {x} ({pts['x'].iloc[0]:g}): no trade-off to plot")
    fig = Figure(figsize=(8.0, 4.6), layout="constrained")
    ax = fig.subplots()
    for label in method_order(pts["label"]):
        _pareto_points(ax, pts[pts["label"] == label].sort_values("x"), label, reference)
    front = pareto_front(pts)  # the frontier's last level extends to the costliest point
    fx, fy = [*front["x"], pts["x"].max()], [*front["score"], front["score"].iloc[-1]]
    ax.plot(fx, fy, drawstyle="steps-post", color="0.5", linestyle=":", linewidth=1.5, label="Pareto frontier")
    ylabel = f"average score (%) over {len(tasks)} tasks" if len(tasks) > 1 else \
        f"{df['main_metric'].iloc[0]} (%) on {tasks[0]}"
    note = sample_note(df[df["task"].isin(tasks)])
    ax.set(xlabel=RESOURCES.get(x, (x, 1.0))[0], ylabel=_wrap(ylabel, 40), ylim=SCORE_LIM)
    resource_axis(ax, pts["x"])
    ax.set_title(f"{model} | {protocol} (point labels: budget)" + (f"\n{note}" if note else ""), fontsize=10)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right center", fontsize=8, frameon=False)  # never over a point
    return fig


def _pareto_points(ax: Axes, p: pd.DataFrame, label: str, reference: str) -> None:
    """One method's points (the reference as a star), joined, each labelled with its budget."""
    is_ref = p["method"].iloc[0] == reference
    ax.plot(p["x"], p["score"], marker="*" if is_ref else method_marker(label), markersize=12 if is_ref else 6,
            linestyle="none" if is_ref else "-", linewidth=1, color=method_color(label),
            label=f"{label} (full cache)" if is_ref else label)
    if not is_ref:
        for _, row in p.iterrows():
            ax.annotate(format_budget(row["budget"]), (row["x"], row["score"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))


def check_formats(formats: Sequence[str]) -> None:
    """One clear error for a figure format matplotlib cannot write."""
    unknown = sorted(set(formats) - set(Figure().canvas.get_supported_filetypes()))
    if unknown:
        raise UsageError(f"figure formats {unknown} are not supported; use e.g. png, pdf, svg")


def save(fig: Figure, out_dir: str | Path, stem: str, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``<out_dir>/<stem>.<fmt>`` for each format (PNG at 150 dpi); returns the paths."""
    check_formats(formats)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out / f"{stem}.{fmt}"
        fig.savefig(path, dpi=150 if fmt == "png" else None)
        paths.append(path)
    return paths

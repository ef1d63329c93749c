"""Results analysis: tables, figures, confidence intervals and run status from a results root.

The public API used by notebooks and ``python -m kvbench.report``::

    from kvbench.report import load_results, summarize, relative_to_full, paper_table, budget_curves, ...
    runs, samples = load_results(root), load_results(root, samples=True)
    summary = relative_to_full(summarize(runs, samples))     # one row per configuration, CI, % of full cache
    paper_table(summary, avg_tasks=[...])                     # methods x tasks per budget, Avg., % of full
    budget_curves(summary); pareto(summary, x="kv_bytes_kept"); needle_heatmaps(samples, budget=0.1)
    write_report(root)                                        # everything above as CSV/Markdown/LaTeX, PNG/PDF
"""

from kvbench.report.build import errors, write_report
from kvbench.report.plots import (
    RESOURCES,
    budget_curves,
    budget_kind,
    needle_heatmaps,
    needle_rows,
    pareto,
    pareto_front,
    save,
)
from kvbench.report.stats import N_RESAMPLES, bootstrap_ci, run_intervals
from kvbench.report.status import scan as run_status
from kvbench.report.style import METHOD_ORDER, method_color, method_order
from kvbench.report.tables import add_labels, paper_table, relative_to_full, summarize, to_latex, to_markdown
from kvbench.results import load_results

__all__ = [
    "METHOD_ORDER", "N_RESAMPLES", "RESOURCES", "add_labels", "bootstrap_ci", "budget_curves", "budget_kind",
    "errors", "load_results", "method_color", "method_order", "needle_heatmaps", "needle_rows", "paper_table",
    "pareto", "pareto_front",
    "relative_to_full", "run_intervals", "run_status", "save", "summarize", "to_latex", "to_markdown",
    "write_report",
]  # fmt: skip

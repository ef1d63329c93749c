"""Results analysis: tables, figures, confidence intervals and run status from a results root.

The public API used by notebooks and ``python -m kvbench.report``::

    from kvbench.report import load_results, summarize, relative_to_full, paper_table, budget_curves, ...
    runs, samples = load_results(root), load_results(root, samples=True)
    summary = relative_to_full(summarize(runs, samples))     # one row per configuration, CI, % of full cache
    paper_table(summary, avg_tasks=[...])                     # methods x tasks per budget, Avg., % of full
    budget_curves(summary); pareto(summary, x="kv_bytes_kept"); needle_heatmaps(samples, budget=0.1)
    write_report(root)                                        # everything above as CSV/Markdown/LaTeX, PNG/PDF
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: public name -> the module that defines it; imported on first use, so that ``python -m kvbench.report --help``
#: and its usage errors answer without loading pandas, matplotlib and scipy
_EXPORTS = {
    "errors": "build", "write_report": "build",
    "RESOURCES": "plots", "budget_curves": "plots", "budget_kind": "plots", "needle_heatmaps": "plots",
    "needle_rows": "plots", "pareto": "plots", "pareto_front": "plots", "save": "plots",
    "N_RESAMPLES": "stats", "bootstrap_ci": "stats", "run_intervals": "stats",
    "run_status": "status",
    "METHOD_ORDER": "style", "method_color": "style", "method_order": "style",
    "add_labels": "tables", "paper_table": "tables", "relative_to_full": "tables", "summarize": "tables",
    "to_latex": "tables", "to_markdown": "tables",
}  # fmt: skip
_RENAMED = {"run_status": "scan"}
__all__ = sorted([*_EXPORTS, "load_results"])


def __getattr__(name: str) -> Any:
    if name == "load_results":
        from kvbench.results import load_results

        return load_results
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"kvbench.report.{_EXPORTS[name]}"), _RENAMED.get(name, name))

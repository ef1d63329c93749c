"""``python -m kvbench.report <root>`` writes tables and figures; ``python -m kvbench.report status <root>``
lists finished, running, partial, failed and (with ``--sweep``) pending runs."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from kvbench.errors import UsageError


def _list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _budgets(text: str | None) -> list[float] | None:
    try:
        return [float(b) for b in _list(text) or []] or None
    except ValueError:
        raise UsageError(f"--budgets takes comma-separated numbers (e.g. 0.1,0.2 or 128,256), got {text!r}") from None


def _report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvbench.report",
                                description="Tables (CSV/Markdown/LaTeX) and figures (PNG/PDF) of a results root. "
                                            "`python -m kvbench.report status <root>` lists run states.")
    p.add_argument("root", nargs="?", default=None,
                   help="results root (default: paths.results, i.e. $KVBENCH_RESULTS or results)")
    p.add_argument("--out", help="output directory (default <root>/report)")
    p.add_argument("--tasks", help="comma-separated tasks of the table (default: all)")
    p.add_argument("--avg-tasks", help="comma-separated tasks of the Avg. column (default: the table's tasks)")
    p.add_argument("--budgets", help="comma-separated budgets of the table (default: all)")
    p.add_argument("--formats", default="png,pdf", help="figure formats (default png,pdf)")
    p.add_argument("--reference", default="fullkv", help="reference method (default fullkv)")
    p.add_argument("--resamples", type=int, default=None, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--wandb", action="store_true", help="also log the tables and figures to wandb (offline)")
    p.add_argument("--wandb-project", default=None)
    p.add_argument("--wandb-mode", default=None, help="offline (default) | online | disabled")
    return p


def _status_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvbench.report status",
                                description="Finished, partial, failed, started and (with --sweep) pending runs. "
                                            "Exit status 1 when a run failed.")
    p.add_argument("root", nargs="?", default=None,
                   help="results root (default: paths.results, i.e. $KVBENCH_RESULTS or results)")
    p.add_argument("--sweep", help="a Hydra multirun directory (holding multirun.yaml): list every job of its grid")
    p.add_argument("--all", action="store_true", help="also list the finished runs")
    return p


def wandb_logger(project: str | None, mode: str | None):  # noqa: ANN201
    """The wandb logger with conf/logger/wandb.yaml's settings (paths.logs from KVBENCH_LOGS or ./logs)."""
    from omegaconf import OmegaConf

    from kvbench.__main__ import CONF_DIR
    from kvbench.loggers import make_logger

    node = OmegaConf.create({"paths": {"logs": os.environ.get("KVBENCH_LOGS", "logs")},
                             "logger": OmegaConf.load(Path(CONF_DIR) / "logger" / "wandb.yaml")})
    settings = OmegaConf.to_container(node, resolve=True)["logger"]
    settings.update({k: v for k, v in (("project", project), ("mode", mode)) if v})
    return make_logger(settings)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.formatwarning = lambda message, *args, **kwargs: f"kvbench.report: warning: {message}\n"
    try:
        if argv and argv[0] == "status":
            args = _status_parser().parse_args(argv[1:])  # before the imports: --help and bad options answer at once
            from kvbench.report.status import main as status

            return status(args.root, args.sweep, args.all)
        args = _report_parser().parse_args(argv)
        budgets = _budgets(args.budgets)
        from kvbench.results import existing_root

        existing_root(args.root)  # a mistyped root answers before matplotlib loads
        from kvbench.report.build import write_report
        from kvbench.report.stats import N_RESAMPLES

        files = write_report(args.root, args.out, _list(args.tasks), _list(args.avg_tasks), budgets,
                             _list(args.formats) or ["png"], args.reference, args.resamples or N_RESAMPLES,
                             args.seed, wandb_logger(args.wandb_project, args.wandb_mode) if args.wandb else None)
    except UsageError as err:
        print(f"kvbench.report: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} files to {files['index'].parent} (start with {files['index']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

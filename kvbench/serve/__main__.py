"""``python -m kvbench.serve [system=...] [workload=...] [hardware=...] [arch=...] [key=value ...]``.

A thin Hydra wrapper around :func:`kvbench.serve.run.run`. The config root is ``conf/serve``; kvbench's
``conf/`` is on the search path so that its launchers work here too (``-m hydra/launcher=slurm``).
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from kvbench.cli import CONF_DIR as CONF
from kvbench.cli import unknown_option

CONF_DIR = str(CONF / "serve")
GROUPS = ("system", "workload", "hardware", "arch", "slo")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> Any:
    from kvbench.errors import UsageError
    from kvbench.serve.run import run

    try:
        m = run(cfg)
    except UsageError as err:
        print(f"kvbench.serve: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(summary_line(m))
    return m["metrics"]


def summary_line(m: dict[str, Any]) -> str:
    x = m["metrics"]
    shown = [(k, x[k]) for k in ("throughput_tok_s", "ttft_s_p99", "tbt_s_p99", "slo_attainment", "hit_ratio",
                                 "tokens_per_s") if isinstance(x.get(k), (int, float))]
    parts = [f"{m['system']} | {m['workload']} | {m['hardware']} | {m['arch']} | kv={m['kv']['tag']}",
             ", ".join(f"{k} {v:.4g}" for k, v in shown), f"run dir: {m['run_dir']}"]
    for name, r in m["baseline_over_system"].items():  # baseline / system of the system's headline metrics
        parts.append(f"{name} / {m['system']}: " + ", ".join(f"{k} x{r[k]:.2f}" for k in m["headline"] if k in r))
    return "\n".join(parts)


if __name__ == "__main__":
    if message := unknown_option(sys.argv[1:], CONF_DIR, GROUPS):
        print(f"kvbench.serve: error: {message}", file=sys.stderr)
        sys.exit(2)
    if not any(a.startswith("hydra.searchpath") for a in sys.argv[1:]):
        sys.argv.append(f"hydra.searchpath=[file://{CONF}]")
    main()

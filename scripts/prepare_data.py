"""Download and cache benchmark data on a machine with network, for compute nodes without it.

    python scripts/prepare_data.py --list                      # the benchmarks that can be prepared
    python scripts/prepare_data.py longbench                   # everything LongBench + LongBench-E needs
    python scripts/prepare_data.py longbench --only hotpotqa   # just some of its datasets
    KVBENCH_DATA=/shared/kvbench-data python scripts/prepare_data.py all

Files land in ``<root>/<benchmark>/`` (``--root``, else ``$KVBENCH_DATA``, else ``./data``); runs read them with
``paths.data=<root>`` (or the same ``KVBENCH_DATA``). Benchmarks are discovered: every ``kvbench.tasks.<module>``
that defines ``BENCHMARK`` and ``prepare(dest, names)`` is listed (see ``kvbench/tasks/hub.py``).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

import kvbench.tasks
from kvbench.errors import UsageError
from kvbench.tasks.hub import data_root


def benchmarks() -> dict[str, ModuleType]:
    """``{BENCHMARK: module}`` for every task module with a ``prepare`` function."""
    found = {}
    for info in pkgutil.iter_modules(kvbench.tasks.__path__):
        module = importlib.import_module(f"kvbench.tasks.{info.name}")
        if callable(getattr(module, "prepare", None)) and isinstance(getattr(module, "BENCHMARK", None), str):
            found[module.BENCHMARK] = module
    return dict(sorted(found.items()))


def main(argv: list[str] | None = None) -> int:
    known = benchmarks()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmark", nargs="?", help=f"one of {', '.join(known)}, or all")
    parser.add_argument("--only", default=None, help="comma-separated datasets of the benchmark (default: all)")
    parser.add_argument("--root", default=None, help="data root (default $KVBENCH_DATA, else ./data)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list or not args.benchmark:
        for name, module in known.items():
            print(f"{name:<14} {(module.__doc__ or '').strip().splitlines()[0]}")
        return 0
    chosen = list(known) if args.benchmark == "all" else [args.benchmark]
    unknown = [b for b in chosen if b not in known]
    if unknown:
        print(f"prepare_data: unknown benchmark {unknown[0]!r}; choose from {', '.join(known)} or all", file=sys.stderr)
        return 2
    names = args.only.split(",") if args.only else None
    try:
        for bench in chosen:
            dest = data_root(args.root) / bench
            files = known[bench].prepare(dest, names)
            print(f"{bench}: {len(files)} files under {dest}")
    except UsageError as err:
        print(f"prepare_data: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

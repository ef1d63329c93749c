"""What the thin Hydra entry points share (``python -m kvbench``, ``python -m kvbench.serve``); no torch."""

from __future__ import annotations

from pathlib import Path

#: kvbench's config tree (``conf/``): beside the package in a checkout, and installed beside it by ``pip install``
#: (pyproject.toml's package data), so one rule finds it in both.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ("model", "method", "allocator", "task")  # the config groups whose option names are checked up front


def unknown_option(argv: list[str], conf_dir: str | Path, groups: tuple[str, ...]) -> str | None:
    """A message for a ``group=option`` that names no config file under ``conf_dir`` (Hydra's own message omits
    subfolders such as ``task/ruler``); None if every option exists."""
    for arg in argv:
        key, eq, value = arg.lstrip("+~").partition("=")
        if not eq or key not in groups or "(" in value:  # sweep functions (choice, glob) are left to Hydra
            continue
        folder = Path(conf_dir) / key
        for option in value.split(","):
            if option and not (folder / f"{option}.yaml").exists():
                known = sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))
                return f"unknown {key} {option!r}; available: {', '.join(known)}"
    return None

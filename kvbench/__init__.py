"""kvbench: a benchmarking harness and experiment runner for KV-cache compression methods."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"


def model_slug(pretrained: str) -> str:
    """A run-directory name for a model: 'org/name' -> 'org--name', a local path -> the name of the directory it
    resolves to (``/models/llama/..`` -> ``models``); any character outside ``[A-Za-z0-9._+=-]`` becomes ``-`` and
    a leading dot ``_`` (``kvbench.validate`` refuses what is still not a safe name)."""
    if pretrained.startswith(("/", ".", "~")):
        name = Path(pretrained).expanduser().resolve().name
    else:
        name = pretrained.replace("embedded:", "").replace("/", "--")
    name = re.sub(r"[^A-Za-z0-9._+=-]", "-", name)
    return "_" + name[1:] if name.startswith(".") else name


if not OmegaConf.has_resolver("kvbench_slug"):
    OmegaConf.register_new_resolver("kvbench_slug", model_slug)

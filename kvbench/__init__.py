"""kvbench: a benchmarking harness and experiment runner for KV-cache compression methods.

The Python API (docs/api.md), imported on first use so that ``import kvbench`` stays cheap (no torch)::

    with kvbench.compress(model, "snapkv", budget=0.2):   # transformers' generate() over the compressed cache
        model.generate(**inputs, max_new_tokens=32)
    kvbench.answer(model, tokenizer, context, ["question?"], method="defensivekv", budget=0.2)
    kvbench.methods.names(), kvbench.methods.SnapKV, kvbench.allocators.Pyramid
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

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


_API = {"compress": "kvbench.api", "answer": "kvbench.api", "load": "kvbench.api", "Answer": "kvbench.api",
        "Compressed": "kvbench.api", "KVBenchCache": "kvbench.engine.hfcache", "methods": None, "allocators": None}


def __getattr__(name: str) -> Any:
    """The Python API's names, imported when first used (``kvbench.methods`` and ``kvbench.allocators`` are
    modules; the rest are attributes of theirs)."""
    if name not in _API:
        raise AttributeError(f"module 'kvbench' has no attribute {name!r}")
    module = _API[name]
    if module is None:
        return importlib.import_module(f"kvbench.{name}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])

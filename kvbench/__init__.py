"""kvbench: a benchmarking harness and experiment runner for KV-cache compression methods."""

from __future__ import annotations

from pathlib import PurePath

from omegaconf import OmegaConf

__version__ = "0.1.0"


def model_slug(pretrained: str) -> str:
    """A run-directory name for a model: 'org/name' -> 'org--name', a local path -> its last part."""
    if pretrained.startswith(("/", ".", "~")):
        return PurePath(pretrained).name
    return pretrained.replace("embedded:", "").replace("/", "--")


if not OmegaConf.has_resolver("kvbench_slug"):
    OmegaConf.register_new_resolver("kvbench_slug", model_slug)

"""Shared helpers of the kvbench.serve tests (no tests here): composing conf/serve and building contexts."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from kvbench.serve.kvsource import KVPolicy
from kvbench.serve.run import context

CONF = Path(__file__).resolve().parents[1] / "conf" / "serve"


def serve_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def ctx_for(*overrides: str, tmp: Path | None = None):
    cfg = serve_cfg(*overrides, *( [f"paths.results={tmp}"] if tmp else []))
    return cfg, context(cfg, KVPolicy(), Path(tmp or "."))

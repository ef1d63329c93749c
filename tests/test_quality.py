"""The embedded default really separates methods (the README's quality bar, on a subset of the default task)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kvbench.runner import run

ROOT = Path(__file__).resolve().parents[1]
SUBSET = ["task.loader.n_samples=6"]  # 6 contexts at each of 1024 and 2048 tokens


def score(tmp_path: Path, *overrides: str) -> dict[str, float]:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.results={tmp_path}", "progress=false", *SUBSET, *overrides])
    assert cfg.task.name == "synth_multikey_dense" and cfg.model.name == "kvbench-tiny", "the default task/model"
    return run(cfg)["score_by_length"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("quality")
    return {
        "full": score(root, "method=fullkv"),
        "snapkv": score(root, "method=snapkv", "budget=0.2"),
        "streamingllm": score(root, "method=streamingllm", "budget=0.2"),
        "snapkv_agnostic": score(root, "method=snapkv", "budget=0.1", "protocol=query_agnostic"),
    }


def test_full_cache_retrieves_at_every_length(results) -> None:
    assert set(results["full"]) == {"1024", "2048"}
    assert all(v["exact_match"] >= 90 for v in results["full"].values())


def test_snapkv_keeps_mid_context_needles_and_streamingllm_cannot(results) -> None:
    for length, full in results["full"].items():
        assert results["snapkv"][length]["exact_match"] >= full["exact_match"] - 10
        assert results["streamingllm"][length]["exact_match"] <= full["exact_match"] - 50


def test_query_agnostic_compression_loses_what_query_aware_keeps(results) -> None:
    agnostic = [v["exact_match"] for v in results["snapkv_agnostic"].values()]
    assert sum(agnostic) / len(agnostic) <= 80

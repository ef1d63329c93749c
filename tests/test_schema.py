"""The documented results schema: every key a run writes is declared in kvbench.schema, every record carries the
hash of its prompt, metrics.json records the kvbench version and git commit, and the report's columns come from
the schema."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import kvbench
from kvbench.report.tables import EFFICIENCY
from kvbench.runner import run
from kvbench.schema import EFFICIENCY_KEYS, RECORD_KEYS, PredictionRecord, RunMetrics

ROOT = Path(__file__).resolve().parents[1]


def config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.results={tmp_path}", "progress=false", "method=snapkv",
                                            "limit=2", *overrides])


@pytest.mark.parametrize("protocol", ["query_aware", "query_agnostic"])
def test_every_written_key_is_in_the_schema_and_each_record_has_a_prompt_hash(tmp_path, protocol) -> None:
    cfg = config(tmp_path, "task=synth_multiquery", f"protocol={protocol}")
    metrics = run(cfg)
    recs = [json.loads(x) for x in (Path(cfg.run_dir) / "predictions.jsonl").read_text().splitlines()]
    assert len(recs) == 6
    for r in recs:
        assert set(r) <= set(RECORD_KEYS), set(r) - set(RECORD_KEYS)
        assert re.fullmatch(r"[0-9a-f]{16}", r["prompt_hash"])
    assert len({r["prompt_hash"] for r in recs}) == 6  # six different prompts (same context, other questions)
    assert set(metrics) <= set(RunMetrics.__annotations__), set(metrics) - set(RunMetrics.__annotations__)
    assert set(PredictionRecord.__annotations__) == set(RECORD_KEYS)


def test_metrics_record_the_kvbench_version_and_git_commit(tmp_path) -> None:
    metrics = run(config(tmp_path, "task=synth_needle"))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert metrics["kvbench"]["version"] == kvbench.__version__
    assert metrics["kvbench"]["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)


def test_the_report_columns_come_from_the_schema() -> None:
    assert list(EFFICIENCY_KEYS) == EFFICIENCY
    assert {"kept_fraction", "kv_bytes_kept", "peak_kv_bytes", "prefill_s", "decode_s_per_token"} <= set(EFFICIENCY)

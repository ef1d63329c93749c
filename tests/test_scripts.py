"""The benchmark scripts run and print what they promise (tiny settings; their numbers are not checked here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml") if p.stem != "hack")  # hack: kvbench.var


def script(*args: str) -> str:
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_efficiency_script_prints_every_method() -> None:
    out = script("scripts/efficiency.py", "--lengths", "256", "--repeats", "1", "--decode", "2")
    header, *lines = out.splitlines()
    columns = re.split(r"\s{2,}", header.strip())  # "method", "tokens", "prefill ms", ...
    rows = {line.split()[0]: dict(zip(columns, line.split(), strict=True)) for line in lines if line.strip()}
    assert sorted(rows) == METHODS
    full = float(rows["fullkv"]["KV full MiB"])
    assert float(rows["fullkv"]["KV kept MiB"]) == full and float(rows["snapkv"]["KV kept MiB"]) < 0.25 * full
    assert float(rows["fullkv"]["compress %"]) == 0 and float(rows["snapkv"]["compress %"]) > 0
    assert float(rows["cake"]["evict ms/tok"]) > 0 == float(rows["snapkv"]["evict ms/tok"])  # decode-time eviction


def test_quality_table_script_writes_runs_and_a_markdown_table(tmp_path) -> None:
    out = script("scripts/quality_table.py", "--methods", "fullkv", "streamingllm", "--budgets", "0.2",
                 "--protocols", "query_aware", "--limit", "2", "--results", str(tmp_path))
    assert "| streamingllm" in out and "| fullkv (reference)" in out and "budget 0.2" in out
    assert len(list(tmp_path.rglob("metrics.json"))) == 2

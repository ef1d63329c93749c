"""A kvbench run directory fed to the simulator: its achieved kept fraction and compression time change what a
request holds, so batch size and latency follow; the report joins the run's accuracy with the simulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_serve_helpers import serve_cfg

from kvbench.errors import UsageError
from kvbench.serve.kvsource import read_run
from kvbench.serve.report import kv_table
from kvbench.serve.run import run

# the metrics.json keys kvbench.runner.aggregate writes (a finished SnapKV run at budget 0.2)
RUN = {"task": "synth_multikey_dense", "model": "kvbench-tiny", "method": "snapkv", "allocator": "uniform",
       "protocol": "query_aware", "budget": 0.2, "kept_fraction": 0.1996, "kv_bytes_full": 3170304.0,
       "kv_bytes_kept": 632832.0, "prefill_s": 0.24, "compress_s": 0.012, "score": {"exact_match": 90.6}}


def kv_run(tmp: Path, **changes: object) -> Path:
    d = tmp / "kvrun" / "budget=0.2"
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps({**RUN, **changes}))
    return d


def test_read_run_takes_the_bytes_really_held(tmp_path: Path) -> None:
    p = read_run(kv_run(tmp_path))
    assert p.kept == pytest.approx(632832 / 3170304) and p.compress_frac == pytest.approx(0.05)
    assert p.tag == "synth_multikey_dense-snapkv-uniform-query_aware-b0.2" and p.score == {"exact_match": 90.6}
    with pytest.raises(UsageError, match="not a finished kvbench run"):
        read_run(tmp_path / "nothing")


def test_compressed_kv_raises_batch_and_lowers_tail_latency_under_memory_pressure(tmp_path: Path) -> None:
    common = ("workload=longprompt", "workload.n_requests=80", "workload.arrival.rate=8", "server.kv_gb=8",
              f"paths.results={tmp_path}", "figures=false")
    full = run(serve_cfg(*common))["metrics"]
    src = kv_run(tmp_path)
    comp = run(serve_cfg(*common, f"kv.source='{src}'"))
    m = comp["metrics"]
    assert comp["kv"]["kept"] == pytest.approx(0.1996, abs=1e-3)
    assert m["max_batch"] > 2 * full["max_batch"]
    assert m["ttft_s_p99"] < full["ttft_s_p99"] and m["throughput_tok_s"] > full["throughput_tok_s"]
    table = kv_table(tmp_path / "serve")
    row = table[table["kv"] != "full"].iloc[0]
    assert row["score"] == 90.6 and row["label"] == "snapkv 0.2"

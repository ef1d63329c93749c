"""End to end on the embedded model: run(cfg), resume after a real kill, protocols, one clear error per bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kvbench.errors import UsageError
from kvbench.models import ModelLoadError, load_model
from kvbench.results import ConfigMismatchError
from kvbench.runner import run

ROOT = Path(__file__).resolve().parents[1]


def config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.results={tmp_path}", "progress=false", *overrides])


def lines(run_dir: str) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "predictions.jsonl").read_text().splitlines()]


def test_run_writes_run_dir_and_second_call_returns_at_once(tmp_path) -> None:
    cfg = config(tmp_path, "method=snapkv", "budget=0.2", "limit=3")
    metrics = run(cfg)
    run_dir = Path(cfg.run_dir)
    assert run_dir == tmp_path / "synth_multikey_dense/kvbench-tiny/snapkv/uniform/query_aware/budget=0.2/seed=0"
    recs = lines(cfg.run_dir)
    assert [r["id"] for r in recs] == [f"multikey-L1024-{i}/q0" for i in range(3)]
    for r in recs:
        assert abs(r["kept_fraction"] - 0.2) < 0.01 and r["kv_bytes_kept"] < 0.21 * r["kv_bytes_full"]
        assert r["prefill_s"] > 0 and r["compress_s"] > 0 and r["decode_s_per_token"] > 0
        assert r["compressed_tokens"] == r["meta"]["context_tokens"] + r["question_tokens"]
    assert metrics["protocol"] == "query_aware" and metrics["compression_ratio"] == pytest.approx(0.8)
    assert set(metrics["score"]) == {"exact_match"} and metrics["n_questions"] == 3
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.config.method.name == "snapkv" and len(saved.config_hash) == 16
    mtime = (run_dir / "metrics.json").stat().st_mtime_ns
    assert run(cfg) == metrics and (run_dir / "metrics.json").stat().st_mtime_ns == mtime


def test_raising_the_limit_extends_a_finished_run(tmp_path) -> None:
    first = run(config(tmp_path, "method=snapkv", "limit=2"))
    cfg = config(tmp_path, "method=snapkv", "limit=4")
    first_lines = lines(cfg.run_dir)
    second = run(cfg)
    assert first["n_questions"] == 2 and second["n_questions"] == 4
    assert lines(cfg.run_dir)[:2] == first_lines and len(lines(cfg.run_dir)) == 4  # the first two were kept
    assert run(config(tmp_path, "method=snapkv", "limit=2"))["n_questions"] == 2  # and nothing rerun


def test_changed_config_for_same_directory_is_refused(tmp_path) -> None:
    run(config(tmp_path, "method=snapkv", "limit=1"))
    with pytest.raises(ConfigMismatchError, match="method.window"):
        run(config(tmp_path, "method=snapkv", "limit=1", "method.window=8"))


def test_query_agnostic_shares_one_compressed_context(tmp_path) -> None:
    cfg = config(tmp_path, "task=synth_multiquery", "method=snapkv", "protocol=query_agnostic", "limit=2")
    run(cfg)
    recs = lines(cfg.run_dir)
    assert len(recs) == 6  # 2 contexts x 3 questions
    for sid in {r["sample_id"] for r in recs}:
        group = [r for r in recs if r["sample_id"] == sid]
        assert len({r["kept_entries"] for r in group}) == 1 and len({r["prefill_s"] for r in group}) == 1
        assert all(r["compressed_tokens"] == r["meta"]["context_tokens"] for r in group)  # question not compressed


@pytest.mark.parametrize("budget", ["0", "-1", "abc"])
def test_bad_budget_is_one_clear_error(tmp_path, budget: str) -> None:
    with pytest.raises(UsageError, match="budget must be"):
        run(config(tmp_path, f"budget={budget}"))


def test_bad_method_parameter_or_task_is_one_clear_error_and_writes_nothing(tmp_path) -> None:
    with pytest.raises(UsageError, match="pooling"):
        run(config(tmp_path, "method=snapkv", "method.pooling=median"))
    with pytest.raises(UsageError, match="unknown synthetic kind"):
        run(config(tmp_path, "task.loader.kind=haystack"))
    assert not list(tmp_path.rglob("config.yaml")), "a rejected config must not claim a run directory"
    run(config(tmp_path, "method=snapkv", "limit=1"))  # the same directory then works with a valid config


def test_missing_required_setting_is_named(tmp_path) -> None:
    with pytest.raises(UsageError, match="model.pretrained"):
        run(config(tmp_path, "model=hf"))


def test_bad_protocol_and_missing_model_path(tmp_path) -> None:
    with pytest.raises(UsageError, match="protocol"):
        run(config(tmp_path, "protocol=sometimes"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        run(config(tmp_path, "model.pretrained=/no/such/model", "limit=1"))
    assert not list(tmp_path.rglob("config.yaml"))


def test_hub_id_offline_names_the_model_and_the_fix(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    overrides = ("model=hf", "model.pretrained=meta-llama/Llama-3.1-8B-Instruct", "model.revision=abc123")
    spec = config(tmp_path, *overrides).model
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache") as err:
        load_model(spec, torch.device("cpu"))
    assert "meta-llama/Llama-3.1-8B-Instruct" in str(err.value) and "hf download" in str(err.value)


def test_resume_after_kill_loses_and_duplicates_nothing(tmp_path) -> None:
    args = ["method=adakv", "budget=0.2", "limit=12", "progress=false"]
    ref_cfg = config(tmp_path / "ref", *args)
    run(ref_cfg)
    expected = [(r["id"], r["prediction"]) for r in lines(ref_cfg.run_dir)]

    cfg = config(tmp_path / "killed", *args)
    pred = Path(cfg.run_dir) / "predictions.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kvbench", f"paths.results={tmp_path / 'killed'}", *args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not pred.exists() or len(pred.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (Path(cfg.run_dir) / "metrics.json").exists(), "the kill came too late to test resume"
    with open(pred, "a") as f:
        f.write('{"id": "multikey-L1024-3/q0", "pred')  # and a half-written line, as a kill mid-write leaves
    run(cfg)
    got = [(r["id"], r["prediction"]) for r in lines(cfg.run_dir)]
    assert sorted(got) == sorted(expected) and len({i for i, _ in got}) == len(got)

"""End to end on kvbench-tiny-vl: ``run(cfg)`` with images and video frames through the engine, on the synthetic
tasks and the benchmark fixtures, resumable; images are never dropped silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kvbench.errors import UsageError
from kvbench.runner import run

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"


def config(tmp_path: Path, *overrides: str):  # noqa: ANN201
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.results={tmp_path}", "progress=false", "model=kvbench-tiny-vl",
                                            *overrides])


def lines(run_dir: str) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "predictions.jsonl").read_text().splitlines()]


def test_synth_gui_runs_full_and_compressed_and_resumes(tmp_path: Path) -> None:
    full = run(config(tmp_path, "task=synth_gui", "method=fullkv", "budget=1.0", "limit=2"))
    assert full["score"]["exact_match"] == 100 and full["n_questions"] == 4
    cfg = config(tmp_path, "task=synth_gui", "method=streamingllm", "budget=0.1", "limit=2")
    lossy = run(cfg)
    assert lossy["score"]["exact_match"] <= 50  # the newest screenshot is not among the recent tokens
    rec = lines(cfg.run_dir)[0]
    assert rec["compressed_tokens"] > 8 * 51 and abs(rec["kept_fraction"] - 0.1) < 0.02  # 8 screenshots of 49 + 2
    assert run(cfg) == lossy  # a finished run is recognised: the in-memory images digest the same in every process


def test_synth_video_query_agnostic(tmp_path: Path) -> None:
    m = run(config(tmp_path, "task=synth_video", "method=snapkv", "budget=0.5", "protocol=query_agnostic", "limit=2"))
    assert m["n_questions"] == 2 and m["protocol"] == "query_agnostic"


@pytest.mark.parametrize("task", ["screenspot/v2", "videomme", "agentnetbench"])
def test_benchmark_fixtures_run_end_to_end(tmp_path: Path, task: str) -> None:
    data = FIX / ("screenspot/v2" if task == "screenspot/v2" else task)
    cfg = config(tmp_path, f"task={task}", f"task.loader.data_dir={data}", "method=snapkv", "budget=0.5",
                 "task.max_new_tokens=6", "limit=3")
    m = run(cfg)
    assert m["n_questions"] >= 3 and "official" in m
    assert all(r["compressed_tokens"] > r["question_tokens"] for r in lines(cfg.run_dir))


def test_agentnetbench_steps_see_the_models_own_earlier_outputs(tmp_path: Path) -> None:
    cfg = config(tmp_path, "task=agentnetbench", f"task.loader.data_dir={FIX / 'agentnetbench'}", "method=fullkv",
                 "budget=1.0", "task.max_new_tokens=3", "limit=3")
    run(cfg)
    recs = lines(cfg.run_dir)
    truth = config(tmp_path / "truth", "task=agentnetbench", f"task.loader.data_dir={FIX / 'agentnetbench'}",
                   "method=fullkv", "budget=1.0", "task.max_new_tokens=3", "limit=3",
                   "task.loader.history=ground_truth")
    run(truth)
    ref = lines(truth.run_dir)
    assert recs[0]["prompt_hash"] == ref[0]["prompt_hash"]  # step 1 has no history
    assert recs[2]["prompt_hash"] != ref[2]["prompt_hash"]  # later steps hold the model's outputs instead


def test_prefill_chunk_and_text_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="prefill_chunk"):
        run(config(tmp_path, "task=synth_gui", "method=snapkv", "prefill_chunk=64", "limit=1"))
    with pytest.raises(UsageError, match="cannot see"):
        run(config(tmp_path, "task=synth_gui", "model=kvbench-tiny", "method=snapkv", "limit=1"))


def test_zipvl_run_records_its_prefill_flops_saved_per_layer_and_per_run(tmp_path: Path) -> None:
    """ZipVL's per-layer statistics reach predictions.jsonl (one value per layer) and metrics.json (their mean):
    the prefill attention FLOPs saved is 1 - ratio^2 in every layer; a method that reports none writes neither."""
    cfg = config(tmp_path, "task=synth_gui", "method=zipvl", "budget=0.1", "limit=1")
    m = run(cfg)
    rec = lines(cfg.run_dir)[0]
    stats = rec["layer_stats"]
    n_layers = len(rec["kept_per_layer"])
    assert len(stats["prefill_attention_flops_saved"]) == len(stats["important_ratio"]) == n_layers
    for saved, ratio in zip(stats["prefill_attention_flops_saved"], stats["important_ratio"], strict=True):
        assert saved == pytest.approx(1 - ratio**2)
        assert 0 < ratio <= 0.1 + 1 / rec["compressed_tokens"]  # budget 0.1 caps the high-precision tokens
    per_question = [sum(r["layer_stats"]["prefill_attention_flops_saved"]) / n_layers for r in lines(cfg.run_dir)]
    assert m["method_stats"]["prefill_attention_flops_saved"] == pytest.approx(sum(per_question) / len(per_question))
    snap = config(tmp_path, "task=synth_gui", "method=snapkv", "budget=0.1", "limit=1")
    assert "method_stats" not in run(snap) and "layer_stats" not in lines(snap.run_dir)[0]

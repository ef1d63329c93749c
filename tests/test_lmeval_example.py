"""The shipped lm-eval example task (kvbench/lmeval_tasks/kvbench_synth.yaml) scores correctly out of the box, and
the bridge's CLI answers --help and bad options fast (torch is not loaded for them), warning once on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
from hydra import compose, initialize_config_dir  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from kvbench.lmeval import KVBenchLM  # noqa: E402
from kvbench.models import load_model  # noqa: E402
from kvbench.runner import run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "kvbench" / "lmeval_tasks"
LIMIT = 4


def kvbench_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["task=synth_multikey_dense", "progress=false", *overrides])


@pytest.fixture(scope="module")
def tiny():
    return load_model(kvbench_config().model, torch.device("cpu"))


def evaluate(lm: KVBenchLM) -> dict:
    return lm_eval.simple_evaluate(model=lm, tasks=["kvbench_synth"], limit=LIMIT, bootstrap_iters=0, log_samples=True,
                                   task_manager=TaskManager(include_path=str(TASKS), include_defaults=False))


def test_example_task_scores_as_kvbench_scores_the_same_questions(tiny, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model, tok = tiny
    full = evaluate(KVBenchLM(pretrained=model, tokenizer=tok, method="fullkv", budget=1.0))
    assert full["results"]["kvbench_synth"]["exact_match,strip"] == 1.0  # right answers score as right
    res = evaluate(KVBenchLM(pretrained=model, tokenizer=tok, method="streamingllm", budget=0.2))
    samples = sorted(res["samples"]["kvbench_synth"], key=lambda s: s["doc_id"])
    raw = [s["resps"][0][0] for s in samples]
    assert all(r != r.strip() for r in raw)  # the bridge does not strip, as HFLM; the task's filter does
    cfg = kvbench_config("method=streamingllm", "budget=0.2", f"limit={LIMIT}", f"paths.results={tmp_path}")
    ours = run(cfg)
    preds = [json.loads(x) for x in (Path(cfg.run_dir) / "predictions.jsonl").read_text().splitlines()]
    assert [s["filtered_resps"][0] for s in samples] == [p["prediction"] for p in preds]
    assert [s["exact_match"] for s in samples] == [p["scores"]["exact_match"] for p in preds]
    assert 100 * res["results"]["kvbench_synth"]["exact_match,strip"] == ours["score"]["exact_match"]


def test_cuda_default_on_a_cpu_machine_is_one_warning(tiny) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    model, tok = tiny
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(2):
            lm = KVBenchLM(pretrained=model, tokenizer=tok, method="snapkv", budget=0.5, device="cuda:0")
            assert lm.cfg.device == "cpu"
    messages = [str(w.message) for w in caught if "CUDA" in str(w.message)]
    assert messages == ["CUDA is not available: kvbench runs on the CPU"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvbench.lmeval", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_help_and_bad_options_answer_before_torch_and_the_task_index() -> None:
    probe = subprocess.run([sys.executable, "-c", "import sys, kvbench.lmeval; print('torch' in sys.modules)"],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert probe.stdout.strip() == "False", probe.stderr[-2000:]
    assert cli("--help").returncode == 0
    for model_args, message in (("method=nope", "unknown method 'nope'; available: adakv"),
                                ("budget=-1", "budget must be > 0"),
                                ("protocol=query_agnostic", "needs split=<marker>")):
        res = cli("--model", "kvbench", "--model_args", f"pretrained=kvbench-tiny,{model_args}", "--tasks", "x")
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and message in res.stderr, res.stderr[-2000:]
        assert "Including path" not in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow  # lm-eval's CLI indexes its ~10k built-in task configs first (a minute or two here)
def test_readme_example_runs_as_written(tmp_path) -> None:
    res = subprocess.run([sys.executable, "-m", "kvbench.lmeval", "--model", "kvbench", "--model_args",
                          "pretrained=kvbench-tiny,method=snapkv,budget=0.2", "--include_path", "kvbench/lmeval_tasks",
                          "--tasks", "kvbench_synth", "--limit", "8", "--output_path", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "CUDA is not available: kvbench runs on the CPU" in res.stderr and "device=cuda:0" not in res.stderr
    out = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert out["results"]["kvbench_synth"]["exact_match,strip"] == 1.0

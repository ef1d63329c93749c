"""The lm-eval bridge (kvbench.lmeval): local YAML tasks over JSONL files this test writes, the embedded model
in memory, offline. Under fullkv it answers exactly as lm-eval's own HFLM; under compression exactly as kvbench's
runner does, so the methods separate as in kvbench's own tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from kvbench.errors import UsageError  # noqa: E402
from kvbench.lmeval import KVBenchLM  # noqa: E402
from kvbench.models import load_model  # noqa: E402
from kvbench.runner import run  # noqa: E402
from kvbench.tasks import load_samples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_DOCS = 6  # synth_multikey_dense contexts of 1024 tokens, 32 key/code needles each, one asked

GEN_TASK = """task: kv_synth_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}} {{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["."], max_gen_toks: 8, do_sample: false}}
filter_list:
  - name: codes
    filter:
      - {{function: regex, regex_pattern: "(k\\\\d+(?: k\\\\d+)*)", group_select: 0}}
      - {{function: take_first}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true}}]
metadata: {{version: 1.0}}
"""

MC_TASK = """task: kv_synth_mc
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}} {{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list: [{{metric: acc}}]
metadata: {{version: 1.0}}
"""


def kvbench_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["task=synth_multikey_dense", "progress=false", *overrides])


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No hub lookups from datasets/lm-eval while these tests run (restored afterwards)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def tasks(offline, tmp_path_factory) -> Path:
    """Two local lm-eval tasks over the first N_DOCS samples of kvbench's synthetic suite (answers known)."""
    root = tmp_path_factory.mktemp("lmeval_tasks")
    samples = load_samples(kvbench_config().task, N_DOCS)
    docs = []
    for i, s in enumerate(samples):
        q = s.questions[0]
        other = samples[(i + 1) % len(samples)].questions[0].answers[0]  # a code of another context
        docs.append({"context": s.context, "question": q.text, "answer": q.answers[0],
                     "choices": [" " + other, " " + q.answers[0]], "label": 1})
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "kv_synth_gen.yaml").write_text(GEN_TASK.format(data=data))
    (root / "kv_synth_mc.yaml").write_text(MC_TASK.format(data=data))
    return root


@pytest.fixture(scope="module")
def tiny():
    """The embedded kvbench-tiny model and tokenizer, loaded by kvbench (in memory, shared by the tests)."""
    return load_model(kvbench_config().model, torch.device("cpu"))


def evaluate(lm, tasks: Path, names: list[str]) -> dict:
    return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=TaskManager(include_path=str(tasks),
                                   include_defaults=False), bootstrap_iters=0, log_samples=True)


def generations(res: dict, task: str = "kv_synth_gen") -> list[str]:
    return [s["resps"][0][0] for s in sorted(res["samples"][task], key=lambda s: s["doc_id"])]


def test_kvbench_is_a_registered_lm_eval_model() -> None:
    assert get_model("kvbench") is KVBenchLM


def test_fullkv_answers_exactly_as_lm_eval_hflm(tiny, tasks) -> None:
    from lm_eval.models.huggingface import HFLM

    model, tok = tiny
    ours = evaluate(KVBenchLM(pretrained=model, tokenizer=tok, method="fullkv", budget=1.0), tasks,
                    ["kv_synth_gen", "kv_synth_mc"])
    ref = evaluate(HFLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=8192), tasks,
                   ["kv_synth_gen", "kv_synth_mc"])
    assert generations(ours) == generations(ref)
    assert ours["results"]["kv_synth_gen"]["exact_match,codes"] == 1.0  # the full cache retrieves every code
    ll = [[r[0] for r in s["resps"]] for s in sorted(ours["samples"]["kv_synth_mc"], key=lambda s: s["doc_id"])]
    ll_ref = [[r[0] for r in s["resps"]] for s in sorted(ref["samples"]["kv_synth_mc"], key=lambda s: s["doc_id"])]
    assert torch.allclose(torch.tensor(ll, dtype=torch.float64), torch.tensor(ll_ref, dtype=torch.float64),
                          atol=1e-3, rtol=1e-4)
    assert ours["results"]["kv_synth_mc"]["acc,none"] == 1.0


def test_compressed_answers_equal_kvbench_runs_and_methods_separate(tiny, tasks, tmp_path) -> None:
    model, tok = tiny
    scores = {}
    for method in ("snapkv", "streamingllm"):
        lm = KVBenchLM(pretrained=model, tokenizer=tok, method=method, budget=0.1)
        res = evaluate(lm, tasks, ["kv_synth_gen"])
        scores[method] = res["results"]["kv_synth_gen"]["exact_match,codes"]
        assert lm.kv_summary()["kept_fraction"] == pytest.approx(0.1, abs=0.01)  # the cache really shrank
        cfg = kvbench_config(f"method={method}", "budget=0.1", f"limit={N_DOCS}", f"paths.results={tmp_path}")
        run(cfg)
        kvbench_preds = [json.loads(x)["prediction"] for x in
                         (Path(cfg.run_dir) / "predictions.jsonl").read_text().splitlines()]
        assert [g.strip() for g in generations(res)] == kvbench_preds  # same engine, same budget semantics
    assert scores["snapkv"] >= 5 / 6 and scores["streamingllm"] <= 1 / 6, scores


def test_query_agnostic_compresses_the_context_before_the_question(tiny, tasks) -> None:
    model, tok = tiny
    lm = KVBenchLM(pretrained=model, tokenizer=tok, method="snapkv", budget=0.2, protocol="query_agnostic",
                   split=" question :")
    res = evaluate(lm, tasks, ["kv_synth_gen"])
    assert all(r["question_tokens"] == 8 for r in lm.records)  # "question : what is the code of <key>"
    assert all(r["compressed_tokens"] == r["context_tokens"] for r in lm.records)
    assert 0 < res["results"]["kv_synth_gen"]["exact_match,codes"] <= 1


def test_string_model_args_load_the_model_through_kvbench(tasks) -> None:
    res = lm_eval.simple_evaluate(model="kvbench", model_args="pretrained=kvbench-tiny,method=adakv,budget=0.1",
                                  tasks=["kv_synth_gen"], limit=2, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    assert res["results"]["kv_synth_gen"]["exact_match,codes"] == 1.0


def test_bad_arguments_get_one_clear_error(tiny) -> None:
    model, tok = tiny
    with pytest.raises(UsageError, match="snapkv"):  # Hydra's message lists the valid methods
        KVBenchLM(pretrained=model, tokenizer=tok, method="nosuchmethod")
    with pytest.raises(UsageError, match="budget"):
        KVBenchLM(pretrained=model, tokenizer=tok, method="snapkv", budget=-1)
    with pytest.raises(UsageError, match="split"):
        KVBenchLM(pretrained=model, tokenizer=tok, protocol="query_agnostic")
    with pytest.raises(UsageError, match="tokenizer"):
        KVBenchLM(pretrained=model)
    lm = KVBenchLM(pretrained=model, tokenizer=tok, method="snapkv", budget=0.5)

    class Req:
        args = ("the code of alice k1 k2 . alice", {"until": ["."], "do_sample": True, "temperature": 0.7})

    with pytest.raises(UsageError, match="greedily"):
        lm.generate_until([Req()])
    with pytest.raises(UsageError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([Req()])


@pytest.mark.slow  # lm-eval's CLI indexes all of its ~10k built-in task configs first (about a minute here)
def test_cli_runs_lm_eval_with_the_kvbench_model(tasks, tmp_path) -> None:
    cmd = [sys.executable, "-m", "kvbench.lmeval", "--model", "kvbench", "--model_args",
           "pretrained=kvbench-tiny,method=snapkv,budget=0.2", "--include_path", str(tasks), "--tasks",
           "kv_synth_gen", "--limit", "2", "--output_path", str(tmp_path / "out")]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert out["results"]["kv_synth_gen"]["exact_match,codes"] == 1.0

"""Budget sweeps with one prefill (``budget=[...]``): the same run directories, records and metrics as separate runs."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import METHODS, layer_store, load_method
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kvbench import sweep
from kvbench.budget import HeadAdaptive, Uniform
from kvbench.engine import Engine, LayerContext
from kvbench.errors import UsageError
from kvbench.method import Method
from kvbench.pipeline import prefill
from kvbench.runner import run
from kvbench.sweep import SweepEngine, fallback_reason, shared_prefill
from methods.snapkv import SnapKV

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (0.05, 0.2, 64)  # fractions and a token budget; 0.05 clamps the 32-token window at 1K tokens
TIMING = {"prefill_s", "compress_s", "question_s", "decode_s_per_token", "peak_mem_bytes", "shared_prefill",
          "shared_answer", "process_max_rss_bytes"}


def config(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.results={root}", "progress=false", *overrides])


def sweep_arg(budgets: tuple) -> str:
    return f"budget=[{','.join(map(str, budgets))}]"


def run_dirs(root: Path) -> dict[str, Path]:
    return {p.parent.parent.name: p.parent for p in root.rglob("metrics.json")}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines()]


def strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in TIMING}


CASES = [  # end to end; every method config is also checked at the engine level below
    ("snapkv", "query_aware", "synth_multikey_dense"),
    ("adakv", "query_aware", "synth_multikey_dense"),  # head-adaptive: ragged per-head caches
    ("defensivekv", "query_aware", "synth_multikey_dense"),  # its scores depend on the budget (stage-1 limit)
    ("pyramidkv", "query_aware", "synth_multikey_dense"),  # per-layer budgets
    ("snapkv", "query_agnostic", "synth_multiquery"),  # 3 questions appended over each budget's compressed context
    ("adakv", "query_agnostic", "synth_multiquery"),
]


@pytest.mark.parametrize(("method", "protocol", "task"), CASES)
def test_shared_prefill_sweep_equals_separate_runs(tmp_path, method: str, protocol: str, task: str) -> None:
    common = (f"method={method}", f"protocol={protocol}", f"task={task}", "limit=2")
    separate = {b: run(config(tmp_path / "separate", *common, f"budget={b}")) for b in BUDGETS}
    swept = run(config(tmp_path / "sweep", *common, sweep_arg(BUDGETS)))
    assert list(swept) == [float(b) for b in BUDGETS]
    sep_dirs, sweep_dirs = run_dirs(tmp_path / "separate"), run_dirs(tmp_path / "sweep")
    assert sorted(sep_dirs) == sorted(sweep_dirs) == sorted(f"budget={b}" for b in BUDGETS)
    for b in BUDGETS:
        a, s = sep_dirs[f"budget={b}"], sweep_dirs[f"budget={b}"]
        assert a.relative_to(tmp_path / "separate") == s.relative_to(tmp_path / "sweep")
        assert (a / "config.yaml").read_text().replace("separate", "sweep") == (s / "config.yaml").read_text()
        ra, rs = records(a), records(s)
        assert len(ra) == len(rs) == (6 if protocol == "query_agnostic" else 2)
        assert [strip(r) for r in ra] == [strip(r) for r in rs]  # predictions, kept entries/bytes, peaks, per layer
        assert all(r["shared_prefill"] is True and r["prefill_s"] > 0 for r in rs)
        assert strip(separate[b]) == strip(swept[float(b)])
    kept = [records(sweep_dirs[f"budget={b}"])[0]["kept_entries"] for b in BUDGETS]
    assert kept[0] < kept[1] and kept[0] != kept[2]  # the budgets really differ
    first = [records(sweep_dirs[f"budget={b}"])[0]["prefill_s"] for b in BUDGETS]
    assert len(set(first)) == 1  # one prefill, recorded in every budget's record


def test_sweep_resumes_each_budget_and_skips_finished_ones(tmp_path) -> None:
    finished = config(tmp_path, "budget=0.05", "limit=2")
    run(finished)
    partial = config(tmp_path, "budget=0.2", "limit=1")
    run(partial)
    mtime = (Path(finished.run_dir) / "metrics.json").stat().st_mtime_ns
    first = records(Path(partial.run_dir))
    out = run(config(tmp_path, "budget=[0.05,0.2,0.5]", "limit=2"))
    assert (Path(finished.run_dir) / "metrics.json").stat().st_mtime_ns == mtime  # finished: returned as it was
    resumed = records(Path(partial.run_dir))
    assert resumed[:1] == first and len(resumed) == 2 and "shared_prefill" not in resumed[0]
    assert resumed[1]["shared_prefill"] is True and out[0.2]["n_questions"] == 2
    reference = run(config(tmp_path / "ref", "budget=0.2", "limit=2"))
    assert strip(reference) == strip(out[0.2])


def test_blockwise_prefill_falls_back_to_budget_by_budget_runs(tmp_path, capsys) -> None:
    out = run(config(tmp_path, "budget=[0.1,0.3]", "prefill_chunk=256", "limit=1"))
    assert "without a shared prefill: block-wise prefill" in capsys.readouterr().err
    assert set(out) == {0.1, 0.3}
    for run_dir in run_dirs(tmp_path).values():
        assert all("shared_prefill" not in r for r in records(run_dir))


def test_method_or_allocator_that_cannot_share_the_prefill_falls_back(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(SnapKV, "shares_prefill", False)
    out = run(config(tmp_path / "a", "method=snapkv", "budget=[0.1,0.3]", "limit=1"))
    assert "method snapkv does not share its prefill" in capsys.readouterr().err and set(out) == {0.1, 0.3}
    assert len(run_dirs(tmp_path / "a")) == 2
    monkeypatch.setattr(SnapKV, "shares_prefill", True)
    run(config(tmp_path / "b", "method=snapkv", "allocator=global_flat", "budget=[0.1,0.3]", "limit=1"))
    assert "allocator global_flat plans across layers (cross_layer)" in capsys.readouterr().err
    assert all("shared_prefill" not in r for d in run_dirs(tmp_path / "b").values() for r in records(d))


@pytest.mark.parametrize(("budgets", "message"), [("[]", "names no budget"), ("[0.1,0.1]", "twice"),
                                                  ("[0.1,abc]", "budget must be a number"),
                                                  ("[0.1,0]", "budget must be > 0")])
def test_bad_budget_list_is_one_clear_error_and_claims_nothing(tmp_path, budgets: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        run(config(tmp_path, f"budget={budgets}", "limit=1"))
    assert not list(tmp_path.rglob("config.yaml"))


def test_cli_budget_list_is_one_job(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "kvbench", f"paths.results={tmp_path}", "budget=[0.1,0.5]",
                           "limit=1", "progress=false"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("run dir") == 2 and sorted(run_dirs(tmp_path)) == ["budget=0.1", "budget=0.5"]


@dataclass
class HiddenNorm(Method):
    """A test method that scores with the attention input hidden states and the budget (``ctx.keep``)."""

    name: str = "hidden_norm"
    window: int = 4

    def score(self, ctx: LayerContext) -> torch.Tensor:
        h = ctx.hidden_states[: ctx.n - ctx.window].float().norm(dim=-1)  # (n - w,)
        return (h[None] * ctx.keys[:, : ctx.n - ctx.window, 0].float()) + ctx.keep  # (H_kv, n - w)


def engine_cases() -> list:
    """Every method config (new ones included) on Llama, and a hidden-state method on Llama and Qwen3."""
    evicting = [m for m in METHODS if layer_store(m) == "evict"]  # quantising methods run at budget 1.0 only
    cases = [pytest.param(lambda m=m: load_method(m), "llama", id=m) for m in evicting]
    for arch in ("llama", "qwen3"):
        cases.append(pytest.param(lambda: (HiddenNorm(), Uniform()), arch, id=f"hidden_norm-{arch}"))
        cases.append(pytest.param(lambda: (HiddenNorm(), HeadAdaptive()), arch, id=f"hidden_norm_adaptive-{arch}"))
    return cases


@pytest.mark.parametrize(("make", "arch"), engine_cases())
def test_sweep_engine_forks_give_the_caches_of_separate_engines(tiny_model, prompt, make, arch: str) -> None:
    method, allocator = make()
    if fallback_reason(OmegaConf.create({"method": {"name": "m"}, "allocator": {"name": "a"}}), method, allocator):
        pytest.skip("this method runs budget sweeps one budget after another")
    model, ids = tiny_model(arch), prompt(96).tolist()
    budgets = [0.1, 0.5, 20, 1.0]
    with SweepEngine(model, method, allocator, budgets) as eng:
        forks = [(b, logits, stats, eng.store, eng.generate(logits, 6)[0])
                 for b, logits, stats in shared_prefill(eng, ids, {}, budgets)]
    for b, logits, stats, store, tokens in forks:
        with Engine(model, method, allocator, b) as ref:
            ref_logits, ref_stats = prefill(ref, ids, {})
            assert torch.equal(logits, ref_logits) and ref.generate(ref_logits, 6)[0] == tokens
            for a, c in zip(store.layers, ref.store.layers, strict=True):
                assert torch.equal(a.lens, c.lens) and torch.equal(a.positions, c.positions)
                assert torch.equal(a.keys, c.keys) and torch.equal(a.values, c.values)
        assert strip(stats) == strip(ref_stats)
    if method.compresses:
        assert forks[0][2]["kept_entries"] < forks[1][2]["kept_entries"]  # the budgets really differ


def test_sweep_speed_script_prints_the_ratio() -> None:
    proc = subprocess.run([sys.executable, "scripts/sweep_speed.py", "--limit", "1", "--repeats", "1", "--budgets",
                           "0.1,0.5", "--breakdown"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("2 budgets, one shared prefill"))
    wall_ratio = float(row.split()[-2].rstrip("x"))
    assert wall_ratio > 0 and "2 separate runs" in proc.stdout and "decode" in proc.stdout


def test_a_failing_sweep_marks_every_budget_it_had_claimed(tmp_path, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("decoding broke")

    monkeypatch.setattr(sweep, "question_record", fail)
    with pytest.raises(RuntimeError, match="decoding broke"):
        run(config(tmp_path, "budget=[0.1,0.3]", "limit=1"))
    errors = sorted(tmp_path.rglob("error.json"))
    assert [p.parent.parent.name for p in errors] == ["budget=0.1", "budget=0.3"]
    assert json.loads(errors[0].read_text())["message"] == "decoding broke"

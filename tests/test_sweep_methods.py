"""Method grids with one prefill (``methods=[...]``): the same run directories, records and metrics as separate runs."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import PREFILL_METHODS, layer_store, load_method
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_families import gemma3
from test_sweep import TIMING, records, strip
from test_validation import cli as validation_cli

from kvbench import sweep
from kvbench.budget import Uniform
from kvbench.engine import Engine, LayerContext
from kvbench.errors import UsageError
from kvbench.method import Method
from kvbench.pipeline import prefill
from kvbench.report.status import _run_ids
from kvbench.results import config_hash
from kvbench.runner import job_configs, run
from kvbench.sweep import SweepEngine, Variant, fallback_reason, shared_prefill
from kvbench.validate import resolve

ROOT = Path(__file__).resolve().parents[1]
GRID = ("fullkv", "snapkv", "adakv", "defensivekv")  # no compression, per-head budgets, flat top-k
BUDGETS = (0.1, 64)


def overrides(root: Path, *extra: str) -> list[str]:
    return [f"paths.results={root}", "progress=false", *extra]


def config(root: Path, *extra: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides(root, *extra))


def grid(root: Path, *extra: str) -> dict:
    """``python -m kvbench <extra>`` as a function: the composed config and the job's overrides."""
    return run(config(root, *extra), overrides=overrides(root, *extra))


def listed(values: tuple) -> str:
    return f"[{','.join(map(str, values))}]"


def run_dirs(root: Path) -> dict[tuple[str, str], Path]:
    """(method, budget=<b>) -> run directory of every finished run under ``root``."""
    return {(p.parents[4].name, p.parents[1].name): p.parent for p in root.rglob("metrics.json")}


@pytest.mark.parametrize(("protocol", "task", "n_records"), [("query_aware", "synth_multikey_dense", 2),
                                                               ("query_agnostic", "synth_multiquery", 6)])
def test_method_grid_equals_separate_runs(tmp_path, protocol: str, task: str, n_records: int) -> None:
    common = (f"protocol={protocol}", f"task={task}", "limit=2")
    separate = {(m, b): run(config(tmp_path / "separate", *common, f"method={m}", f"budget={b}"))
                for m in GRID for b in BUDGETS}
    out = grid(tmp_path / "grid", *common, f"methods={listed(GRID)}", f"budget={listed(BUDGETS)}")
    assert list(out) == [(m, float(b)) for m in GRID for b in BUDGETS]
    sep, swept = run_dirs(tmp_path / "separate"), run_dirs(tmp_path / "grid")
    assert sorted(sep) == sorted(swept) and len(sep) == len(GRID) * len(BUDGETS)
    for (m, b), metrics in separate.items():
        a, s = sep[(m, f"budget={b}")], swept[(m, f"budget={b}")]
        assert a.relative_to(tmp_path / "separate") == s.relative_to(tmp_path / "grid")
        assert (a / "config.yaml").read_text().replace("separate", "grid") == (s / "config.yaml").read_text()
        ra, rs = records(a), records(s)
        assert len(ra) == len(rs) == n_records
        assert [strip(r) for r in ra] == [strip(r) for r in rs]  # predictions, kept entries/bytes, peaks, per layer
        assert all(r["shared_prefill"] is True for r in rs)
        assert strip(metrics) == strip(out[(m, float(b))])
    first = {records(d)[0]["prefill_s"] for d in swept.values()}
    assert len(first) == 1  # one prefill, recorded in every method's and budget's record
    kept = {m: records(swept[(m, "budget=0.1")])[0]["kept_entries"] for m in GRID}
    assert kept["fullkv"] > kept["snapkv"] and kept["snapkv"] != records(swept[("snapkv", "budget=64")])[0][
        "kept_entries"]


def test_grid_run_configs_and_hashes_are_those_of_single_runs(tmp_path) -> None:
    """Each (method, budget) is composed as ``method=<m> budget=<b>`` (its allocator default included; an
    explicit allocator= wins as it does for one method), with the same config hash and run directory."""
    for extra in ((), ("allocator=uniform",), ("+experiment=synth_budget_curve", "protocol=query_agnostic")):
        ov = overrides(tmp_path, *extra, "methods=[adakv,pyramidkv,h2o]", "budget=[0.1,0.3]")
        configs = job_configs(config(tmp_path, *extra, "methods=[adakv,pyramidkv,h2o]", "budget=[0.1,0.3]"), ov)
        assert list(configs) == [(m, b) for m in ("adakv", "pyramidkv", "h2o") for b in (0.1, 0.3)]
        for (m, b), one in configs.items():
            (alone,) = job_configs(config(tmp_path, *extra, f"method={m}", f"budget={b}")).values()
            assert resolve(one) == resolve(alone) and "methods" not in one
            assert config_hash(resolve(one)) == config_hash(resolve(alone)) and one.run_dir == alone.run_dir
        if not extra:
            assert configs[("adakv", 0.1)].allocator.name == "head_adaptive"
        if extra == ("allocator=uniform",):
            assert {one.allocator.name for one in configs.values()} == {"uniform"}


def test_grid_resumes_each_run_and_skips_finished_ones(tmp_path) -> None:
    finished = config(tmp_path, "method=snapkv", "budget=0.1", "limit=2")
    run(finished)
    partial = config(tmp_path, "method=adakv", "budget=0.1", "limit=1")
    run(partial)
    mtime = (Path(finished.run_dir) / "metrics.json").stat().st_mtime_ns
    first = records(Path(partial.run_dir))
    out = grid(tmp_path, "methods=[snapkv,adakv]", "budget=[0.1,0.5]", "limit=2")
    assert (Path(finished.run_dir) / "metrics.json").stat().st_mtime_ns == mtime  # finished: returned as it was
    resumed = records(Path(partial.run_dir))
    assert resumed[:1] == first and len(resumed) == 2 and "shared_prefill" not in resumed[0]
    assert resumed[1]["shared_prefill"] is True and out[("adakv", 0.1)]["n_questions"] == 2
    reference = run(config(tmp_path / "ref", "method=adakv", "budget=0.1", "limit=2"))
    assert strip(reference) == strip(out[("adakv", 0.1)])
    before = records(Path(finished.run_dir))
    more = grid(tmp_path, "methods=[snapkv,adakv]", "budget=[0.1,0.5]", "limit=3")  # a larger limit extends all
    assert {k: m["n_samples"] for k, m in more.items()} == {k: 3 for k in out}
    assert records(Path(finished.run_dir))[:2] == before


def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts ``Engine.generate`` calls (one per answered question)."""
    calls: list[int] = []
    real = Engine.generate

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", counted)
    return calls


@pytest.mark.parametrize(("protocol", "task", "questions"), [("query_aware", "synth_multikey_dense", 2),
                                                              ("query_agnostic", "synth_multiquery", 6)])
def test_fullkv_budgets_of_a_grid_answer_once(tmp_path, monkeypatch, protocol: str, task: str, questions: int) -> None:
    """fullkv keeps the same full cache at every budget: one decode per question for all its budgets, the same
    records in each budget's run directory (marked shared_answer), equal to a separate run's."""
    common = (f"protocol={protocol}", f"task={task}", "limit=2")
    calls = decodes(monkeypatch)
    grid(tmp_path / "grid", *common, "methods=[fullkv,snapkv]", "budget=[0.1,0.2,0.5]")
    assert len(calls) == questions * (1 + 3)  # fullkv once, snapkv per budget
    dirs = run_dirs(tmp_path / "grid")
    full = [records(dirs[("fullkv", f"budget={b}")]) for b in (0.1, 0.2, 0.5)]
    assert full[0] == full[1] == full[2] and all(r["shared_answer"] is True for r in full[0])
    assert not any("shared_answer" in r for r in records(dirs[("snapkv", "budget=0.1")]))
    separate = run(config(tmp_path / "separate", *common, "method=fullkv", "budget=0.2"))
    sep = records(next(p.parent for p in (tmp_path / "separate").rglob("metrics.json")))
    assert [strip(r) for r in sep] == [strip(r) for r in full[1]]
    assert strip(separate) == strip(run(config(tmp_path / "grid", *common, "method=fullkv", "budget=0.2")))


def test_fullkv_budgets_resumed_unevenly_answer_what_each_lacks(tmp_path, monkeypatch) -> None:
    """Budgets of fullkv with different questions left to do answer apart (each only what it lacks)."""
    common = ("protocol=query_agnostic", "task=synth_multiquery")
    run(config(tmp_path, *common, "method=fullkv", "budget=0.2", "limit=1"))
    calls = decodes(monkeypatch)
    grid(tmp_path, *common, "methods=[fullkv]", "budget=[0.1,0.2]", "limit=2")
    assert len(calls) == 3 + 3  # sample 1: budget 0.1 only; sample 2: one answer for both budgets
    dirs = run_dirs(tmp_path)
    low, high = records(dirs[("fullkv", "budget=0.1")]), records(dirs[("fullkv", "budget=0.2")])
    assert [strip(r) for r in low] == [strip(r) for r in high] and len(low) == 6
    assert ["shared_answer" in r for r in high] == [False] * 3 + [True] * 3


def test_a_method_that_cannot_share_runs_after_the_shared_group(tmp_path, capsys) -> None:
    """CAKE (cascading prefill eviction, decode-time eviction) and a cross-layer allocator run alone, one after
    another over the same model, each exactly as a separate run."""
    methods = ("snapkv", "cake", "layer_defensivekv", "fullkv")
    out = grid(tmp_path / "grid", f"methods={listed(methods)}", "budget=[0.1,0.3]", "limit=1")
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "without a shared prefill" in x)
    assert line.startswith("[kvbench] method grid: cake,layer_defensivekv without a shared prefill")
    assert "method cake does not share its prefill" in line and "allocator global_flat plans across layers" in line
    assert err.count("without a shared prefill") == 1
    dirs = run_dirs(tmp_path / "grid")
    for m in methods:
        for b in (0.1, 0.3):
            rs = records(dirs[(m, f"budget={b}")])
            assert all(("shared_prefill" in r) == (m in ("snapkv", "fullkv")) for r in rs)
            alone = run(config(tmp_path / "alone", f"method={m}", f"budget={b}", "limit=1"))
            assert strip(alone) == strip(out[(m, b)])


@pytest.mark.parametrize(("value", "message"), [
    ("[snapkv,bogus]", r"unknown method 'bogus'; available: .*adakv.*snapkv"),
    ("[]", "names no method"), ("[snapkv,snapkv]", "twice"), ("[snapkv,0.5]", "must name method options")])
def test_bad_method_list_is_one_clear_error_and_claims_nothing(tmp_path, value: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        grid(tmp_path, f"methods={value}", "limit=1")
    assert not list(tmp_path.rglob("config.yaml"))


def test_methods_and_method_together_or_without_overrides_are_refused(tmp_path) -> None:
    with pytest.raises(UsageError, match="both name the method"):
        grid(tmp_path, "method=snapkv", "methods=[snapkv,adakv]", "limit=1")
    with pytest.raises(UsageError, match=r"pass them, run\(cfg, overrides="):
        run(config(tmp_path, "methods=[snapkv,adakv]", "limit=1"))
    assert not list(tmp_path.rglob("config.yaml"))


def test_a_failing_grid_marks_every_run_it_had_claimed(tmp_path, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("decoding broke")

    run(config(tmp_path, "method=snapkv", "budget=0.1", "limit=1"))  # finished before: not claimed, not marked
    monkeypatch.setattr(sweep, "question_record", fail)
    with pytest.raises(RuntimeError, match="decoding broke"):
        grid(tmp_path, "methods=[snapkv,adakv,cake]", "budget=[0.1,0.3]", "limit=1")
    marked = sorted((p.parents[4].name, p.parents[1].name) for p in tmp_path.rglob("error.json"))
    assert marked == [(m, f"budget={b}") for m in ("adakv", "cake") for b in (0.1, 0.3)] + [("snapkv", "budget=0.3")]


def test_cli_multirun_sweeps_method_grids_from_an_experiment_file(tmp_path) -> None:
    """``python -m kvbench -m +experiment=<file>`` whose sweeper params list the methods (``methods: "[...]"``):
    one grid job per protocol, each method composed with the job's overrides and the config search path."""
    exp = tmp_path / "conf" / "experiment"
    exp.mkdir(parents=True)
    (exp / "grid_test.yaml").write_text(
        "# @package _global_\nlimit: 1\nhydra:\n  sweeper:\n    params:\n"
        "      methods: '[fullkv,adakv]'\n      protocol: query_aware,query_agnostic\n      budget: '[0.2]'\n")
    proc = subprocess.run([sys.executable, "-m", "kvbench", "-m", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                           "+experiment=grid_test", f"paths.results={tmp_path / 'multi'}", f"paths.logs={tmp_path}",
                           "progress=false", "task=synth_multiquery"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    dirs = sorted(p.relative_to(tmp_path / "multi").parts[2:5] for p in (tmp_path / "multi").rglob("metrics.json"))
    assert dirs == sorted((m, a, p) for m, a in (("fullkv", "uniform"), ("adakv", "head_adaptive"))
                          for p in ("query_aware", "query_agnostic"))


def test_status_lists_every_run_of_a_grid_job(tmp_path) -> None:
    """``python -m kvbench.report status --sweep`` expands a grid job into its runs (one per method and budget)."""
    job = ["methods=[fullkv,adakv]", "budget=[0.2,0.5]", f"paths.results={tmp_path}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        ids = _run_ids(compose, job)
    assert ids == [f"synth_multikey_dense/kvbench-tiny/{m}/query_aware/budget={b}/seed=0"
                   for m in ("fullkv/uniform", "adakv/head_adaptive") for b in (0.2, 0.5)]


@dataclass
class CachedNorm(Method):
    """A test method that caches its scores in ``ctx.memo`` under a key without its parameter: two instances
    sharing a memo would score with the first one's ``power``."""

    name: str = "cached_norm"
    window: int = 4
    power: float = 1.0

    def score(self, ctx: LayerContext) -> torch.Tensor:
        if "norm" not in ctx.memo:
            ctx.memo["norm"] = ctx.keys[:, : ctx.n - ctx.window].float().norm(dim=-1).pow(self.power)  # (H_kv, n - w)
        return ctx.memo["norm"]


def grid_variants(model: torch.nn.Module) -> dict:
    """Every evicting method with a KV-head cache that shares its prefill and runs on ``model`` (CompressKV has
    calibrations of the tiny Llama only), each its own instance, at two budgets; and two instances of one
    memo-caching method with different parameters. (One engine stores its layers one way: the query-head methods,
    guikv, are forked on their own in tests/test_sweep.py.)"""
    variants = {}
    for name in PREFILL_METHODS:
        method, allocator = load_method(name)
        cfg = OmegaConf.create({"method": {"name": name}, "allocator": {"name": "a"}})
        if (layer_store(name) != "evict" or method.cache != "kv_head"
                or fallback_reason(cfg, method, allocator) is not None):
            continue
        with contextlib.suppress(UsageError):  # the runner's own check: a calibration for this model
            method.prepare(model)
            variants.update({(name, b): Variant(method, allocator, b) for b in (0.1, 20)})
    for power in (1.0, -1.0):
        variants.update({(f"norm^{power}", b): Variant(CachedNorm(power=power), Uniform(), b) for b in (0.3, 12)})
    return variants


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # Gemma-3: sliding-window layers (kept, not compressed)
def test_grid_engine_forks_give_the_caches_of_separate_engines(tiny_model, prompt, one_thread, arch: str) -> None:
    """Caches, logits, generations and statistics (peak KV bytes replayed as a separate run holds them, local
    layers included) of every fork equal a separate engine's."""
    model, ids = (tiny_model("llama") if arch == "llama" else gemma3()), prompt(96).tolist()
    variants = grid_variants(model)
    assert {"fullkv", "snapkv", "adakv", "defensivekv", "h2o"} <= {k[0] for k in variants}
    with SweepEngine.over(model, variants) as eng:
        forks = [(k, logits, stats, eng.store, eng.generate(logits, 4)[0])
                 for k, logits, stats in shared_prefill(eng, ids, {}, list(variants))]
    kept = {}
    for k, logits, stats, store, tokens in forks:
        v = variants[k]
        with Engine(model, v.method, v.allocator, v.budget) as ref:
            ref_logits, ref_stats = prefill(ref, ids, {})
            assert torch.equal(logits, ref_logits) and ref.generate(ref_logits, 4)[0] == tokens, k
            for a, c in zip(store.layers, ref.store.layers, strict=True):
                assert torch.equal(a.lens, c.lens) and torch.equal(a.positions, c.positions), k
                assert torch.equal(a.keys, c.keys) and torch.equal(a.values, c.values), k
        assert strip(stats) == strip(ref_stats), k
        kept[k] = store.layers[-1].positions.tolist()  # a global layer (Gemma-3 tiny: the last)
    assert kept[("norm^1.0", 0.3)] != kept[("norm^-1.0", 0.3)]  # the two parameter sets really differ
    assert TIMING  # the same volatile keys as the budget sweep tests


def test_variants_storing_layers_differently_cannot_share_one_engine(tiny_model) -> None:
    snap, alloc = load_method("snapkv")
    per_query_head, _ = load_method("snapkv", ("method.cache=query_head",))
    with pytest.raises(ValueError, match="stores its layers one way"):
        SweepEngine.over(tiny_model("llama"), {1: Variant(snap, alloc, 0.1), 2: Variant(per_query_head, alloc, 0.1)})


def test_cli_refuses_a_bad_method_list_before_torch_loads(tmp_path) -> None:
    res = validation_cli(tmp_path, "methods=[snapkv,bogus]")
    assert "EXIT 2" in res.stdout and "IMPORTED False False" in res.stdout, res.stderr[-2000:]
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvbench: error: methods: unknown method 'bogus'; available: ")
    assert not (tmp_path / "results").exists()

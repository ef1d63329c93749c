"""kvbench.report on a hand-made results root in the exact on-disk format (RunStore + the runner's aggregate):
table values against hand-computed numbers, bootstrap intervals, figures, and the CLI."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kvbench.errors import UsageError
from kvbench.report import (
    bootstrap_ci,
    budget_curves,
    errors,
    load_results,
    method_color,
    method_order,
    needle_heatmaps,
    paper_table,
    pareto,
    pareto_front,
    relative_to_full,
    summarize,
    write_report,
)
from kvbench.results import RunStore, config_hash
from kvbench.runner import aggregate

ROOT = Path(__file__).resolve().parents[1]

# (task, method, budget, seed) -> per-question exact match (4 questions each); hand-computed scores in comments
RUNS = {
    ("ta", "fullkv", 1.0, 0): [1, 1, 1, 1],        # 100
    ("tb", "fullkv", 1.0, 0): [1, 1, 1, 0],        # 75     -> full-cache Avg. 87.5
    ("ta", "snapkv", 0.5, 0): [1, 1, 1, 0],        # 75
    ("tb", "snapkv", 0.5, 0): [1, 1, 0, 0],        # 50     -> Avg. 62.5, 71.43 % of full
    ("ta", "snapkv", 0.2, 0): [1, 1, 0, 0],        # 50
    ("tb", "snapkv", 0.2, 0): [1, 0, 0, 0],        # 25     -> Avg. 37.5, 42.86 %
    ("ta", "streamingllm", 0.5, 0): [1, 0, 0, 0],  # 25 \  mean 37.5, std 17.678
    ("ta", "streamingllm", 0.5, 1): [1, 1, 0, 0],  # 50 /
    ("tb", "streamingllm", 0.5, 0): [0, 0, 0, 0],  # 0  \  mean 12.5, std 17.678 -> Avg. 25.0, 28.57 %
    ("tb", "streamingllm", 0.5, 1): [1, 0, 0, 0],  # 25 /
    ("ta", "streamingllm", 0.2, 0): [0, 0, 0, 0],  # 0, no tb run -> Avg. NaN
}  # fmt: skip
KV_FULL = 1000


def config(task: str, method: str, budget: float, seed: int) -> dict:
    return {"task": {"name": task, "metrics": ["exact_match"]}, "model": {"name": "m"}, "method": {"name": method},
            "allocator": {"name": "uniform"}, "protocol": "query_aware", "budget": budget, "seed": seed,
            "limit": None}


def record(i: int, score: int, budget: float, depth: float, length: int) -> dict:
    return {"id": f"s{i}/q0", "sample_id": f"s{i}", "question_id": "q0", "prediction": "k1" if score else "k9",
            "references": ["k1"], "scores": {"exact_match": float(score)}, "kept_fraction": budget,
            "kv_bytes_full": KV_FULL, "kv_bytes_kept": budget * KV_FULL, "compressed_tokens": 100,
            "peak_kv_bytes": budget * KV_FULL, "peak_mem_bytes": None, "prefill_s": 0.1, "compress_s": 0.01 * budget,
            "decode_s_per_token": 0.002, "meta": {"kind": "needle", "target_length": length, "depth": depth}}


def write_root(root: Path) -> Path:
    for (task, method, budget, seed), scores in RUNS.items():
        cfg = config(task, method, budget, seed)
        store = RunStore(root / task / "m" / method / "uniform" / "query_aware" / f"budget={budget}" / f"seed={seed}",
                         cfg)
        store.open()
        recs = [record(i, s, budget, depth=[0.0, 1.0][i % 2], length=[512, 1024][i // 2])
                for i, s in enumerate(scores)]
        for r in recs:
            store.append(r)
        store.write_metrics(aggregate(recs, cfg, budget, config_hash(cfg), torch.device("cpu")))
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_root(tmp_path_factory.mktemp("results"))


@pytest.fixture(scope="module")
def summary(root) -> pd.DataFrame:
    return relative_to_full(summarize(load_results(root), load_results(root, samples=True)))


def row(summary: pd.DataFrame, task: str, method: str, budget: float) -> pd.Series:
    sel = summary[(summary.task == task) & (summary.method == method) & (summary.budget == budget)]
    assert len(sel) == 1
    return sel.iloc[0]


def test_load_results_has_config_keys_and_main_score(root) -> None:
    runs = load_results(root)
    assert len(runs) == len(RUNS)
    assert {"task", "method", "budget", "seed", "run_dir", "main_metric", "main_score", "score.exact_match",
            "method.name", "kv_bytes_kept"} <= set(runs.columns)
    r = runs[(runs.task == "tb") & (runs.method == "snapkv") & (runs.budget == 0.5)].iloc[0]
    assert r.main_score == 50.0 and r.main_metric == "exact_match"
    samples = load_results(root, samples=True)
    assert len(samples) == 4 * len(RUNS) and set(samples.main_score) == {0.0, 100.0}
    assert {"meta.depth", "meta.target_length", "prediction"} <= set(samples.columns)


def test_summary_mean_std_over_seeds_and_percent_of_full(summary) -> None:
    s = row(summary, "ta", "streamingllm", 0.5)
    assert s.score == 37.5 and s.n_seeds == 2 and s["std"] == pytest.approx(math.sqrt(2 * 12.5**2))
    assert s.n_questions == 8 and s.reference_score == 100.0 and s.pct_of_full == 37.5
    assert row(summary, "tb", "snapkv", 0.5).pct_of_full == pytest.approx(100 * 50 / 75)
    assert math.isnan(row(summary, "ta", "snapkv", 0.5)["std"])
    ci = row(summary, "ta", "snapkv", 0.5)
    assert ci.ci_low <= 75 <= ci.ci_high and ci.ci_high <= 100


def test_paper_table_matches_hand_computed_numbers(summary) -> None:
    t = paper_table(summary)
    assert list(t.columns) == ["ta", "tb", "Avg.", "% of full"]
    assert list(t.index.names) == ["model", "protocol", "budget", "n", "method"]
    assert set(t.index.get_level_values("n")) == {"4"}  # 4 questions per run on every task
    b5 = t.xs(("m", "query_aware", 0.5, "4"), level=["model", "protocol", "budget", "n"])
    assert list(b5.index) == ["fullkv", "streamingllm", "snapkv"]  # reference first, then the fixed order
    assert b5.loc["fullkv"].tolist() == [100.0, 75.0, 87.5, 100.0]
    assert b5.loc["snapkv"].tolist() == pytest.approx([75.0, 50.0, 62.5, 100 * 62.5 / 87.5])
    assert b5.loc["streamingllm"].tolist() == pytest.approx([37.5, 12.5, 25.0, 100 * 25 / 87.5])
    b2 = t.xs(("m", "query_aware", 0.2, "4"), level=["model", "protocol", "budget", "n"])
    assert b2.loc["snapkv", "Avg."] == 37.5 and b2.loc["snapkv", "% of full"] == pytest.approx(100 * 37.5 / 87.5)
    assert b2.loc["streamingllm", "ta"] == 0.0 and math.isnan(b2.loc["streamingllm", "Avg."])  # tb missing
    only_a = paper_table(summary, avg_tasks=["ta"]).xs(("m", "query_aware", 0.5, "4"), level=[0, 1, 2, 3])
    assert only_a.loc["snapkv", "Avg."] == 75.0 and only_a.loc["snapkv", "% of full"] == 75.0
    std = paper_table(summary, value="std").xs(("m", "query_aware", 0.5, "4"), level=[0, 1, 2, 3])
    assert std.loc["streamingllm", "ta"] == pytest.approx(17.6777, abs=1e-3)
    with pytest.raises(UsageError, match="not in the table"):
        paper_table(summary, tasks=["ta"], avg_tasks=["tb"])
    with pytest.raises(UsageError, match="no finished runs"):
        paper_table(summary, tasks=["nosuch"])


def test_bootstrap_is_seeded_and_has_the_normal_width() -> None:
    x = np.array([1.0, 0.0] * 200) * 100  # mean 50, n 400: normal 95 % half-width 1.96 * 50 / 20 = 4.9
    lo, hi = bootstrap_ci(x, seed=0)
    assert (lo, hi) == bootstrap_ci(x, seed=0) and (lo, hi) != bootstrap_ci(x, seed=1)
    assert lo == pytest.approx(45.1, abs=0.8) and hi == pytest.approx(54.9, abs=0.8)
    assert bootstrap_ci([100.0] * 5) == (100.0, 100.0)
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_style_is_one_fixed_mapping() -> None:
    assert method_order(["zeta", "snapkv", "fullkv", "alpha", "h2o"]) == ["fullkv", "h2o", "snapkv", "alpha", "zeta"]
    assert method_color("fullkv") == "#000000" and method_color("snapkv") != method_color("adakv")
    assert method_color("new_method") == method_color("new_method")


def test_pareto_front() -> None:
    pts = pd.DataFrame({"x": [1, 2, 3, 4, 5], "score": [10, 5, 30, 30, 20]})
    assert pareto_front(pts)["x"].tolist() == [1, 3]


def test_figures_have_labels_and_legends(root, summary) -> None:
    fig = budget_curves(summary)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("KV budget") and "exact_match" in ax.get_ylabel()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["streamingllm", "snapkv", "fullkv (full cache)"]
    line = next(li for li in ax.get_lines() if li.get_label() == "snapkv")
    assert line.get_color() == method_color("snapkv") and list(line.get_ydata()) == [50.0, 75.0]
    p = pareto(summary, x="kv_bytes_kept")
    assert "MiB" in p.axes[0].get_xlabel() and p.legends  # beside the axes, never over a point
    heat = needle_heatmaps(load_results(root, samples=True), budget=0.5, task="ta")
    titles = [a.get_title() for a in heat.axes if a.get_title()]
    assert titles == ["fullkv (full cache): 100.0", "streamingllm: 37.5", "snapkv: 75.0"]
    img = heat.axes[2].images[0].get_array()  # snapkv on ta: [[1 (d0,512), 1 (d0,1024)], [1 (d1,512), 0 (d1,1024)]]
    assert np.asarray(img).tolist() == [[100.0, 100.0], [100.0, 0.0]]


def test_error_view_compares_with_the_full_cache(root) -> None:
    view = errors(load_results(root, samples=True), task="tb", method="snapkv", budget=0.5)
    assert view["id"].tolist() == ["s2/q0", "s3/q0"]
    assert view["reference_score"].tolist() == [100.0, 0.0]  # s2 broken by compression; s3 fails with full cache too


def test_write_report_files(root, tmp_path) -> None:
    files = write_report(root, tmp_path / "rep", formats=("png", "pdf"))
    names = {p.name for p in files.values()}
    assert {"table.csv", "table.md", "table.tex", "summary.csv", "runs.csv", "index.md",
            "curves_m_query_aware_fraction.png", "curves_m_query_aware_fraction.pdf",
            "pareto_memory_m_query_aware.png", "pareto_latency_m_query_aware.png",
            "needle_ta_m_query_aware_budget=0.5.png"} <= names
    assert all(p.stat().st_size > 0 for p in files.values())
    md = (tmp_path / "rep" / "table.md").read_text()
    lines = [" ".join(line.replace("|", " ").split()) for line in md.splitlines()]
    assert "0.5 4 snapkv **75.0** **50.0** **62.5** **71.4**" in lines
    assert "0.5 4 streamingllm 37.5 ± 17.7 12.5 ± 17.7 25.0 28.6" in lines
    assert "0.2 4 streamingllm 0.0 - - -" in lines
    tex = (tmp_path / "rep" / "table.tex").read_text()
    assert "\\toprule" in tex and "\\textbf{75.0}" in tex and "\\% of full" in tex
    runs = pd.read_csv(tmp_path / "rep" / "runs.csv")
    assert len(runs) == len(RUNS) and (runs.ci_low <= runs.main_score).all() and (runs.main_score <= runs.ci_high).all()


def test_cli_writes_the_report_and_rejects_bad_input(root, tmp_path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kvbench.report", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=300)

    res = cli(str(root), "--out", str(tmp_path / "r"), "--formats", "png", "--avg-tasks", "ta")
    assert res.returncode == 0, res.stderr[-2000:]
    table = pd.read_csv(tmp_path / "r" / "table.csv")
    assert table[(table.method == "snapkv") & (table.budget == 0.5)]["Avg."].item() == 75.0
    bad = cli(str(root), "--out", str(tmp_path / "bad"), "--tasks", "nosuch")
    assert bad.returncode == 2 and "nosuch" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--budgets", "abc"], "comma-separated numbers"), (["--budgets", "0.3"], "budgets [0.3] have no finished runs"),
    (["--formats", "xyz"], "formats ['xyz']"), (["--avg-tasks", "tc"], "not in the table's tasks"),
])  # fmt: skip
def test_bad_report_options_are_one_error_and_write_nothing(root, tmp_path, capsys, args, message) -> None:
    from kvbench.report.__main__ import main

    assert main([str(root), "--out", str(tmp_path / "bad"), *args]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main([str(tmp_path / "empty_root")]) == 2 and "empty_root does not exist" in capsys.readouterr().err


def test_per_question_rows_are_the_ones_the_metrics_count(tmp_path) -> None:
    """A run rerun with a smaller limit re-aggregates over its first samples; the per-question frame follows."""
    cfg = config("ta", "snapkv", 0.5, 0)
    store = RunStore(tmp_path / "run", cfg)
    store.open()
    recs = [record(i, s, 0.5, 0.0, 512) for i, s in enumerate([1, 0, 0])]
    for r in recs:
        store.append(r)
    store.write_metrics(aggregate(recs[:2], cfg, 0.5, config_hash(cfg), torch.device("cpu")))  # limit=2 rerun
    samples = load_results(tmp_path, samples=True)
    assert samples["id"].tolist() == ["s0/q0", "s1/q0"]
    assert samples["main_score"].mean() == load_results(tmp_path)["main_score"].item() == 50.0


def test_several_protocols_and_budget_kinds_are_kept_apart(summary) -> None:
    other = summary.assign(protocol="query_agnostic", score=summary["score"] / 2)
    tokens = summary[summary.budget == 0.5].assign(budget=128.0)
    both = pd.concat([summary, other, tokens], ignore_index=True)
    t = paper_table(both)
    assert t.loc[("m", "query_agnostic", 0.5, "4", "snapkv"), "ta"] == 37.5
    assert t.loc[("m", "query_aware", 128.0, "4", "snapkv"), "ta"] == 75.0
    assert t.loc[("m", "query_agnostic", 0.5, "4", "snapkv"), "% of full"] == pytest.approx(100 * 62.5 / 87.5)
    with pytest.raises(UsageError, match="several protocols"):
        budget_curves(both)
    with pytest.raises(UsageError, match="pass kind="):
        budget_curves(both, protocol="query_aware")
    fig = budget_curves(both, protocol="query_aware", kind="tokens")
    assert fig.axes[0].get_xlabel() == "KV budget (tokens per KV head)"
    assert "query_agnostic" in budget_curves(both, protocol="query_agnostic").get_suptitle()

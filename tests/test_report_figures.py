"""The report never misleads: sample sets (n) kept apart, context-clustered intervals, needle depths in either unit,
figures that would be empty skipped (and said so), readable axes. Hand-made results roots in the on-disk format;
the checks read axis ranges, tick labels and text extents, not pixels."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from kvbench.errors import UsageError
from kvbench.report import (
    bootstrap_ci,
    budget_curves,
    load_results,
    needle_heatmaps,
    paper_table,
    pareto,
    relative_to_full,
    summarize,
    to_markdown,
    write_report,
)
from kvbench.results import RunStore, config_hash
from kvbench.runner import aggregate


def write_run(root: Path, task: str, method: str, budget: float, scores: list[int], seed: int = 0,
              depths: list[float] | None = None, questions_per_context: int = 1) -> None:
    """One finished run: question i scores ``scores[i]``; contexts hold ``questions_per_context`` questions."""
    cfg = {"task": {"name": task, "metrics": ["exact_match"]}, "model": {"name": "m"}, "method": {"name": method},
           "allocator": {"name": "uniform"}, "protocol": "query_agnostic", "budget": budget, "seed": seed,
           "limit": None}
    store = RunStore(root / task / method / f"budget={budget}" / f"seed={seed}", cfg)
    store.open()
    recs = []
    for i, s in enumerate(scores):
        ctx = i // questions_per_context
        depth = depths[ctx % len(depths)] if depths else 0.5
        recs.append({"id": f"s{ctx}/q{i}", "sample_id": f"s{ctx}", "question_id": f"q{i}", "prediction": "a",
                     "references": ["a"], "scores": {"exact_match": float(s)}, "kept_fraction": min(budget, 1.0),
                     "kv_bytes_full": 1000, "kv_bytes_kept": 1000 * min(budget, 1.0), "prefill_s": 0.1,
                     "compress_s": 0.01, "decode_s_per_token": 0.002, "peak_kv_bytes": 1000, "peak_mem_bytes": None,
                     "compressed_tokens": 100,
                     "meta": {"kind": "needle", "target_length": [512, 1024][ctx % 2], "depth": depth}})
    for r in recs:
        store.append(r)
    store.write_metrics(aggregate(recs, cfg, budget, config_hash(cfg), torch.device("cpu")))


def report_frames(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    samples = load_results(root, samples=True)
    return relative_to_full(summarize(load_results(root), samples)), samples


def test_runs_on_other_questions_are_a_separate_block_with_their_own_reference(tmp_path) -> None:
    write_run(tmp_path, "ta", "fullkv", 1.0, [1, 1, 1, 1])        # 4 questions (all)
    write_run(tmp_path, "ta", "snapkv", 0.5, [1, 1, 1, 0])        # 4 questions: 75
    write_run(tmp_path, "ta", "streamingllm", 0.5, [1, 0])        # limit=2: 50, no reference on these 2
    write_run(tmp_path, "ta", "h2o", 0.2, [0, 0, 0, 0])           # alone in its block, at 0.0
    summary, _ = report_frames(tmp_path)
    assert summary.set_index("method")["n"].to_dict() == {"fullkv": 4, "snapkv": 4, "streamingllm": 2, "h2o": 4}
    assert math.isnan(summary.set_index("method").loc["streamingllm", "pct_of_full"])  # not against other questions
    t = paper_table(summary)
    assert list(t.index) == [("m", "query_agnostic", 0.2, "4", "fullkv"), ("m", "query_agnostic", 0.2, "4", "h2o"),
                             ("m", "query_agnostic", 0.5, "4", "fullkv"), ("m", "query_agnostic", 0.5, "4", "snapkv"),
                             ("m", "query_agnostic", 0.5, "2", "streamingllm")]
    assert t.loc[("m", "query_agnostic", 0.5, "4", "snapkv"), "% of full"] == 75.0
    assert math.isnan(t.loc[("m", "query_agnostic", 0.5, "2", "streamingllm"), "% of full"])
    md = to_markdown(t)
    assert "**" not in md  # every block has a single compressed entry: nothing is "best"
    assert [c.strip() for c in md.splitlines()[2].split("|")[1:4]] == ["budget", "n", "method"]


def test_best_is_bold_only_among_different_values(tmp_path) -> None:
    write_run(tmp_path, "ta", "fullkv", 1.0, [1, 1])
    write_run(tmp_path, "ta", "snapkv", 0.5, [0, 0])
    write_run(tmp_path, "ta", "h2o", 0.5, [0, 0])
    write_run(tmp_path, "ta", "snapkv", 0.2, [1, 0])
    write_run(tmp_path, "ta", "h2o", 0.2, [0, 0])
    lines = [" ".join(x.replace("|", " ").split()) for x in to_markdown(paper_table(report_frames(tmp_path)[0]))
             .splitlines()]
    assert "0.5 2 snapkv 0.0 0.0 0.0" in lines and "0.5 2 h2o 0.0 0.0 0.0" in lines  # a tie at 0.0 is no best
    assert "0.2 2 snapkv **50.0** **50.0** **50.0**" in lines and "0.2 2 h2o 0.0 0.0 0.0" in lines


def test_seeds_on_different_sample_sets_are_refused(tmp_path) -> None:
    write_run(tmp_path, "ta", "snapkv", 0.5, [1, 1, 1, 0], seed=0)
    write_run(tmp_path, "ta", "snapkv", 0.5, [1, 0], seed=1)
    summary, _ = report_frames(tmp_path)
    assert sorted(summary["n"]) == [2, 4]  # two rows, never one mean over 6 questions of two sample sets
    with pytest.raises(UsageError, match=r"different sample sets \(n = \[2, 4\]"):
        paper_table(summary)


def test_cluster_bootstrap_is_wider_where_questions_share_a_context() -> None:
    contexts = np.repeat(np.arange(10), 20)  # 10 contexts x 20 questions, each context all right or all wrong
    scores = np.where(contexts % 2 == 0, 100.0, 0.0)
    lo_q, hi_q = bootstrap_ci(scores)  # independent questions: n = 200, half-width ~ 1.96 * 50 / sqrt(200) = 6.9
    lo_c, hi_c = bootstrap_ci(scores, clusters=contexts)  # 10 contexts: half-width ~ 1.96 * 50 / sqrt(10) = 31
    assert hi_q - lo_q == pytest.approx(13.9, abs=2.5)
    assert hi_c - lo_c > 3.5 * (hi_q - lo_q) and 45 <= hi_c - lo_c <= 70
    assert lo_c <= 50 <= hi_c
    one_each = np.arange(200)  # one question per context: exactly the ordinary bootstrap
    assert bootstrap_ci(scores, clusters=one_each) == (lo_q, hi_q)
    assert all(math.isnan(v) for v in bootstrap_ci([100.0, 0.0], clusters=["a", "a"]))  # one context: no interval


def test_summary_and_runs_intervals_resample_contexts(tmp_path) -> None:
    scores = [1] * 10 + [0] * 10 + [1] * 10 + [0] * 10  # 4 contexts of 10 questions
    write_run(tmp_path, "ta", "snapkv", 0.5, scores, questions_per_context=10)
    summary, samples = report_frames(tmp_path)
    row = summary.iloc[0]
    assert (row.n_questions, row.n_contexts) == (40, 4)
    assert row.ci_high - row.ci_low == pytest.approx(100.0)  # 4 contexts of 0 or 100: the interval spans 0-100
    independent = bootstrap_ci(samples["main_score"])
    assert independent[1] - independent[0] < 40


def test_single_budget_and_missing_tasks_give_readable_figures(tmp_path) -> None:
    write_run(tmp_path, "ta", "fullkv", 1.0, [1, 1])
    write_run(tmp_path, "tb", "fullkv", 1.0, [1, 0])
    write_run(tmp_path, "ta", "snapkv", 0.2, [1, 0])
    write_run(tmp_path, "ta", "streamingllm", 0.2, [0, 0])  # no method ran tb compressed
    summary, _ = report_frames(tmp_path)
    fig = budget_curves(summary)
    assert [ax.get_title() for ax in fig.axes] == ["ta"]  # no empty tb panel
    ax = fig.axes[0]
    assert ax.get_xlim() == pytest.approx((0.1, 0.3)) and list(ax.get_xticks()) == [0.2]
    assert ax.get_ylim() == (-3, 105)  # 0-100, points at 0 not cut by the frame
    with pytest.raises(UsageError, match=r"no compressed configuration that ran all of \['ta', 'tb'\]"):
        pareto(summary)
    assert pareto(summary, tasks=["ta"]).axes[0].get_ylim() == (-3, 105)
    with pytest.raises(UsageError, match="no compressed runs with fraction budgets"):
        budget_curves(summary, tasks=["tb"])


def test_log_budget_axis_ticks_are_the_budgets(tmp_path) -> None:
    write_run(tmp_path, "a_task_with_a_rather_long_name/and_a_subset_name", "fullkv", 1.0, [1, 1])
    for b in (0.02, 0.05, 0.1, 0.2, 0.5):
        write_run(tmp_path, "a_task_with_a_rather_long_name/and_a_subset_name", "snapkv", b, [1, 0])
    fig = budget_curves(report_frames(tmp_path)[0])
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.02", "0.05", "0.1", "0.2", "0.5"]
    assert len(ax.get_xticks(minor=True)) == 0  # no minor labels crowding the major ones
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    box = fig.bbox
    for text in [fig._suptitle, ax.title, *ax.get_xticklabels()]:
        ext = text.get_window_extent(canvas.get_renderer())
        assert box.x0 <= ext.x0 and ext.x1 <= box.x1 and box.y0 <= ext.y0 and ext.y1 <= box.y1, text.get_text()


@pytest.mark.parametrize("depths", [[0.0, 0.5, 1.0], [0.0, 50.0, 100.0]], ids=["fractions", "percents"])
def test_needle_depths_are_percent_whatever_the_task_records(tmp_path, depths) -> None:
    write_run(tmp_path, "needle_t", "fullkv", 1.0, [1] * 6, depths=depths)
    write_run(tmp_path, "needle_t", "snapkv", 0.2, [1, 1, 0, 1, 0, 1], depths=depths)  # (depth, length) per context
    fig = needle_heatmaps(load_results(tmp_path, samples=True), budget=0.2)
    for ax in fig.axes[:2]:
        assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "50", "100"]
        assert ax.get_ylabel() == "needle depth (%)"
    assert np.asarray(fig.axes[1].images[0].get_array()).tolist() == [[100.0, 100.0], [0.0, 100.0], [0.0, 100.0]]


def test_report_index_says_which_figures_were_not_drawn(tmp_path) -> None:
    root = tmp_path / "root"
    write_run(root, "ta", "fullkv", 1.0, [1, 1])
    write_run(root, "tb", "fullkv", 1.0, [1, 1])
    write_run(root, "ta", "snapkv", 0.2, [1, 0])
    with pytest.warns(UserWarning, match="pareto_memory_m_query_agnostic: skipped"):
        files = write_report(root, tmp_path / "rep", formats=("png",))
    assert not any(name.startswith("pareto") for name in files)
    index = (tmp_path / "rep" / "index.md").read_text()
    assert "## Figures not drawn" in index
    assert "`pareto_memory_m_query_agnostic`: kv_bytes_kept has no compressed configuration that ran all" in index
    assert "curves_m_query_agnostic_fraction.png" in files


def test_every_reader_takes_the_root_from_kvbench_results(tmp_path, monkeypatch, capsys) -> None:
    from kvbench.report.__main__ import main

    root = tmp_path / "elsewhere"
    write_run(root, "ta", "fullkv", 1.0, [1, 1])
    write_run(root, "ta", "snapkv", 0.2, [1, 0])
    monkeypatch.setenv("KVBENCH_RESULTS", str(root))
    assert main(["--formats", "png"]) == 0 and (root / "report" / "index.md").is_file()
    assert main(["status", "--all"]) == 0 and "2 finished" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("KVBENCH_RESULTS", str(tmp_path / "empty"))
    assert main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "empty (paths.results; set KVBENCH_RESULTS" in err and "no finished" in err
    assert main(["status"]) == 0 and capsys.readouterr().out.startswith("no runs under")
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    res = subprocess.run([sys.executable, str(scripts / "ruler_table.py")], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "KVBENCH_RESULTS": str(tmp_path / "empty")})
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "no finished runs" in res.stderr


def test_a_table_without_a_reference_run(tmp_path) -> None:
    write_run(tmp_path, "ta", "snapkv", 0.1, [1, 0])
    t = paper_table(report_frames(tmp_path)[0])
    assert list(t.index) == [("m", "query_agnostic", 0.1, "2", "snapkv")]
    assert t.loc[("m", "query_agnostic", 0.1, "2", "snapkv"), "ta"] == 50.0 and math.isnan(t["% of full"].item())

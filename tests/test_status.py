"""``kvbench.report status``: finished, partial, failed (error.json written by the runner), started, and pending
jobs of a Hydra sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir

import kvbench.runner as runner
from kvbench.report.status import scan
from kvbench.results import RunStore

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def cfg_for(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["limit=2", "progress=false", f"paths.results={tmp_path / 'results'}",
                                            "task=synth_needle", *overrides])


def test_a_failing_run_records_error_json_and_a_rerun_clears_it(tmp_path, monkeypatch) -> None:
    cfg = cfg_for(tmp_path, "method=snapkv", "budget=0.2")
    calls = {"n": 0}
    original = runner.run_sample

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "run_sample", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated"):
        runner.run(cfg)
    err = json.loads((Path(cfg.run_dir) / "error.json").read_text())
    assert err["type"] == "RuntimeError" and "simulated" in err["message"] and err["n_predictions"] == 1
    assert "crash_on_second" in err["traceback"]
    st = scan(tmp_path / "results")
    assert st[["state", "n_predictions"]].values.tolist() == [["failed", 1]]
    assert "RuntimeError: CUDA out of memory" in st.error[0]

    monkeypatch.setattr(runner, "run_sample", original)
    runner.run(cfg)  # resumes from the one finished question
    assert not (Path(cfg.run_dir) / "error.json").exists()
    assert scan(tmp_path / "results").state.tolist() == ["finished"]


def test_a_run_that_fails_for_another_configs_directory_marks_nothing(tmp_path) -> None:
    runner.run(cfg_for(tmp_path, "method=snapkv", "budget=0.2", "limit=1"))
    other = cfg_for(tmp_path, "method=snapkv", "budget=0.2", "limit=1", "method.window=8")
    with pytest.raises(runner.UsageError, match="different configuration"):
        runner.run(other)
    assert not (Path(other.run_dir) / "error.json").exists()


def write_run(root: Path, run_id: str, state: str) -> None:
    parts = run_id.split("/")
    cfg = {"task": {"name": parts[0]}, "method": {"name": parts[2]}, "budget": float(parts[5].split("=")[1]),
           "seed": 0}
    store = RunStore(root / run_id, cfg)
    store.open()
    if state in ("partial", "finished", "failed"):
        store.append({"id": "a"})
    if state == "finished":
        store.write_metrics({"n_questions": 1})
    if state == "failed":
        store.write_error(ValueError("bad"))
    store.unlock()  # these runs' processes are gone


def test_status_states_and_pending_sweep_jobs(tmp_path) -> None:
    root = tmp_path / "results"
    ids = {s: f"synth_multikey_dense/kvbench-tiny/{m}/uniform/query_aware/budget={b}/seed=0"
           for s, m, b in (("finished", "snapkv", 0.1), ("partial", "snapkv", 0.2), ("failed", "streamingllm", 0.1),
                           ("started", "streamingllm", 0.2))}
    for state, run_id in ids.items():
        write_run(root, run_id, state)
    (root / "report").mkdir()  # a report directory and Hydra files are not runs
    st = scan(root).set_index("run_id")
    assert {ids[s]: s for s in ids} == st["state"].to_dict()
    assert st.loc[ids["partial"], "n_predictions"] == 1 and st.loc[ids["failed"], "error"] == "ValueError: bad"

    # a sweep over method x budget (as Hydra writes multirun.yaml); h2o has no run dirs: job 4 not started (its
    # submitit stderr says why), job 5 started by Hydra (job dir) without claiming its run dir
    sweep = tmp_path / "logs" / "sweeps" / "d" / "t"
    (sweep / "0").mkdir(parents=True)
    (sweep / "5").mkdir()
    (sweep / ".submitit" / "77_4").mkdir(parents=True)
    (sweep / ".submitit" / "77_4" / "77_4_0_log.err").write_text("loading\nkvbench: error: model not found\n\n")
    task = ["method=snapkv,streamingllm,h2o", "budget=0.1,0.2", "limit=1", f"paths.results={root}"]
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}}}))
    st = scan(root, sweep)
    assert len(st) == 6 and st.job.tolist() == list(range(6))
    assert st.state.tolist() == ["finished", "partial", "failed", "started", "pending", "started"]
    assert st.run_id[4] == "synth_multikey_dense/kvbench-tiny/h2o/uniform/query_aware/budget=0.1/seed=0"
    assert st.error[4] == "kvbench: error: model not found" and "no run directory" in st.error[5]
    assert st.job_dir[0] == str(sweep / "0") and pd.isna(st.job_dir[1])

    shared = tmp_path / "logs" / "sweeps" / "d" / "shared"  # one job, a shared-prefill budget list
    shared.mkdir(parents=True)
    task = ["method=snapkv", "budget=[0.1,0.2]", f"paths.results={root}"]
    (shared / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}}}))
    assert scan(root, shared)[["job", "state"]].values.tolist() == [[0, "finished"], [0, "partial"]]

    res = subprocess.run([sys.executable, "-m", "kvbench.report", "status", str(root), "--sweep", str(sweep)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 1, res.stderr  # a failed run
    assert res.stdout.startswith("1 finished, 0 running, 1 partial, 1 failed, 2 started, 1 pending")
    assert "ValueError: bad" in res.stdout and ids["finished"] not in res.stdout  # finished runs only with --all
    bad = subprocess.run([sys.executable, "-m", "kvbench.report", "status", str(tmp_path / "nope")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr

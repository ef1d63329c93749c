"""One writer per run directory: a kernel lock (flock) that a dead process releases, a busy directory refused at
once without marking it failed, and ``report status`` telling a running run from a killed one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import kvbench.runner as runner
from kvbench.report.status import scan
from kvbench.results import LOCK_FILE, RunDirBusyError, RunStore

ROOT = Path(__file__).resolve().parents[1]

HOLD = """
import sys, time
from kvbench.results import RunStore
store = RunStore(sys.argv[1], {})
store.lock()
print("locked", flush=True)
time.sleep(600)
"""


def cfg_for(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["limit=1", "progress=false", f"paths.results={tmp_path / 'results'}",
                                            "task=synth_needle", "method=snapkv", "budget=0.2", *overrides])


def hold(run_dir: Path) -> subprocess.Popen:
    """Another process holding ``run_dir``'s lock (as a second job of a resubmitted sweep would)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_store_is_refused_until_the_first_releases(tmp_path) -> None:
    first, second = RunStore(tmp_path / "run", {"a": 1}), RunStore(tmp_path / "run", {"a": 1})
    first.open()
    owner = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["host"]
    with pytest.raises(RunDirBusyError, match=f'"pid": {os.getpid()}'):
        second.open()
    assert second.holder() is not None
    first.unlock()
    assert second.holder() is None
    second.open()
    second.unlock()


def test_a_busy_run_directory_stops_at_once_and_is_not_marked_failed(tmp_path) -> None:
    cfg = cfg_for(tmp_path)
    run_dir = Path(cfg.run_dir)
    proc = hold(run_dir)
    try:
        t0 = time.perf_counter()
        with pytest.raises(RunDirBusyError, match=f'"pid": {proc.pid}'):
            runner.run(cfg)
        assert time.perf_counter() - t0 < 60
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE], "the other process's directory is untouched"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    metrics = runner.run(cfg)  # a killed holder released the lock
    assert metrics["n_questions"] >= 1 and not (run_dir / "error.json").exists()
    assert RunStore(run_dir, {}).holder() is None, "a finished run releases its directory"
    assert runner.run(cfg) == metrics  # and runs again in the same process


def test_status_shows_a_live_writer_as_running_and_a_dead_one_as_partial(tmp_path) -> None:
    cfg = cfg_for(tmp_path, "limit=2")
    run_dir = Path(cfg.run_dir)
    runner.run(cfg)
    (run_dir / "metrics.json").unlink()  # as if killed after its answers
    assert scan(tmp_path / "results").state.tolist() == ["partial"]
    proc = hold(run_dir)
    try:
        st = scan(tmp_path / "results")
        assert st.state.tolist() == ["running"] and f'"pid": {proc.pid}' in st.error[0]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert scan(tmp_path / "results").state.tolist() == ["partial"]


def test_overwrite_waits_for_nobody_and_deletes_nothing_of_a_live_run(tmp_path) -> None:
    cfg = cfg_for(tmp_path)
    runner.run(cfg)
    run_dir = Path(cfg.run_dir)
    before = sorted(p.name for p in run_dir.iterdir())
    proc = hold(run_dir)
    try:
        with pytest.raises(RunDirBusyError):
            runner.run(cfg_for(tmp_path, "overwrite=true"))
        assert sorted(p.name for p in run_dir.iterdir()) == before
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

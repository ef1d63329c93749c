"""Durability per answer: every protocol appends each answer as soon as it is scored, so repeated SIGKILLs lose at
most the question in flight and the resumed predictions equal an uninterrupted run's; SIGINT ends with one line
and a resumable run; a full disk (a real file-size limit, RLIMIT_FSIZE) is one message, leaves no temporary file
and loses nothing already written."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kvbench.runner import run

ROOT = Path(__file__).resolve().parents[1]
EPI_SMALL = ("method.block=512", "method.profile_tokens=1024", "method.profile_block=256", "method.profile_sink=16")
QA = ("task=synth_multiquery", "method=snapkv", "protocol=query_agnostic", "limit=3", "budget=0.2")  # 3 x 3 questions
EPISODIC = ("task=synth_conversation", "method=epicache", "protocol=query_agnostic", "limit=1", "budget=0.1",
            *EPI_SMALL)  # one conversation of 24 questions


def config(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.results={root}", "progress=false", *overrides])


def complete_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    raw = path.read_bytes()
    return [json.loads(x) for x in raw[: raw.rfind(b"\n") + 1].decode().splitlines() if x.strip()]


def start(root: Path, args: tuple[str, ...], **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "kvbench", f"paths.results={root}", f"paths.logs={root.parent / 'logs'}",
           "progress=false", "hydra.output_subdir=null", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def wait_for(pred: Path, ready, proc: subprocess.Popen, timeout: float = 240) -> bool:
    """Poll ``predictions.jsonl`` until ``ready(number of complete lines)``; False if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready(len(complete_lines(pred))):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def key(r: dict) -> tuple:
    return r["prediction"], r["scores"], r.get("prompt_hash"), r["kept_entries"], r.get("episode")


def killed_and_resumed(tmp_path: Path, args: tuple[str, ...], per_context: int, targets: list[int]) -> None:
    """Kill the CLI once the answers reach each of ``targets`` (all mid-context), resume, compare."""
    ref = config(tmp_path / "ref", *args)
    run(ref)
    expected = {r["id"]: key(r) for r in complete_lines(Path(ref.run_dir) / "predictions.jsonl")}
    root = tmp_path / "killed"
    pred = Path(config(root, *args).run_dir) / "predictions.jsonl"
    kept: dict[str, tuple] = {}
    for target in targets:
        assert target % per_context, "kill mid-context"
        proc = start(root, args)
        reached = wait_for(pred, lambda n, t=target: n >= t and n % per_context, proc)  # on disk mid-context
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        got = complete_lines(pred)
        assert reached, f"the answers of a context must reach the disk one by one (stuck at {len(got)})"
        ids = [r["id"] for r in got]
        assert len(ids) == len(set(ids)), "no answer written twice"
        assert kept.items() <= {r["id"]: key(r) for r in got}.items(), "an answer on disk before a kill survives it"
        kept = {r["id"]: key(r) for r in got}
        assert not (pred.parent / "metrics.json").exists()
    run(config(root, *args))  # the resume
    final = complete_lines(pred)
    assert len(final) == len({r["id"] for r in final}) == len(expected)
    assert {r["id"]: key(r) for r in final} == expected, "identical to the uninterrupted run"


@pytest.mark.slow
def test_repeated_sigkill_during_query_agnostic_contexts(tmp_path) -> None:
    killed_and_resumed(tmp_path, QA, per_context=3, targets=[1, 5, 7])


@pytest.mark.slow
def test_repeated_sigkill_during_an_episodic_context(tmp_path) -> None:
    killed_and_resumed(tmp_path, EPISODIC, per_context=24, targets=[3, 11])


def test_sigint_is_one_line_and_leaves_a_resumable_run(tmp_path) -> None:
    args = ("task=synth_multikey_dense", "method=snapkv", "limit=32", "budget=0.2")  # 32: cannot end before the signal
    root = tmp_path / "r"
    cfg = config(root, *args)
    pred = Path(cfg.run_dir) / "predictions.jsonl"
    # a shell's background job inherits SIGINT ignored (and Python keeps it ignored): restore the default, as a
    # terminal's Ctrl-C finds it
    proc = start(root, args, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert wait_for(pred, lambda n: n >= 1, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines() == [
        f"kvbench: interrupted; every answer scored so far is kept under {root}: rerun the same command to resume"]
    assert not (Path(cfg.run_dir) / "error.json").exists() and not (Path(cfg.run_dir) / "metrics.json").exists()
    n = len(complete_lines(pred))
    metrics = run(cfg)
    assert metrics["n_questions"] == 32 and n >= 1 and len(complete_lines(pred)) == 32


def limit_file_size(n_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))  # writes past it fail with EFBIG

    return apply


def test_a_full_disk_is_one_message_leaves_no_temp_file_and_loses_nothing(tmp_path) -> None:
    args = ("task=synth_multikey_dense", "method=snapkv", "limit=12", "budget=0.2")
    ref = config(tmp_path / "ref", *args)
    run(ref)
    ref_dir = Path(ref.run_dir)
    expected = complete_lines(ref_dir / "predictions.jsonl")
    size = (ref_dir / "predictions.jsonl").stat().st_size
    cap = max((ref_dir / "config.yaml").stat().st_size, (ref_dir / "metrics.json").stat().st_size) + 2048
    assert cap < size, "the cap must fall inside predictions.jsonl"
    root = tmp_path / "full"
    proc = start(root, args, preexec_fn=limit_file_size(cap))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert [ln for ln in err.splitlines() if ln.startswith("kvbench")] == err.strip().splitlines()
    assert len(err.strip().splitlines()) == 1 and "no space left" in err
    assert not list(root.rglob("*.tmp")), "no temporary file left behind"
    pred = Path(config(root, *args).run_dir) / "predictions.jsonl"
    raw = pred.read_bytes()
    assert raw.endswith(b"\n") and 0 < len(raw) <= cap, "only complete lines"
    got = complete_lines(pred)
    strip = ("prefill_s", "compress_s", "decode_s_per_token", "question_s", "peak_mem_bytes")
    assert [{k: v for k, v in r.items() if k not in strip} for r in got] == [
        {k: v for k, v in r.items() if k not in strip} for r in expected[: len(got)]]
    assert run(config(root, *args))["n_questions"] == 12  # room again: it resumes from what was written


ATOMIC = """
import resource, sys
from pathlib import Path
from kvbench.runfiles import DiskFullError, atomic_write
resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
target = Path(sys.argv[1])
try:
    atomic_write(target, "x" * 1000)
except DiskFullError as err:
    print("FULL", err)
print("LEFT", sorted(p.name for p in target.parent.iterdir()))
"""


def test_an_atomic_write_on_a_full_disk_leaves_no_temporary_file(tmp_path) -> None:
    (tmp_path / "error.json").write_text("{}")
    res = subprocess.run([sys.executable, "-c", ATOMIC, str(tmp_path / "error.json")], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert "FULL no space left" in res.stdout, res.stderr
    assert "LEFT ['error.json']" in res.stdout and (tmp_path / "error.json").read_text() == "{}"

"""Sweeps on a REAL single-node Slurm cluster (scripts/slurm_local.sh): a grid in which one job times out and
requeues itself, one is preempted and requeued by Slurm, and one is SIGKILLed and completed by resubmitting the
sweep; every run ends with exactly the predictions of an uninterrupted run.

The cluster is started by ``bash scripts/slurm_local.sh up`` (apt-installs Slurm + munge when missing, so it needs
root and apt-get; skipped with the reason otherwise) and stopped again at the end if this session started it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
LIMIT = 8  # contexts per run, each of 4K tokens: long enough to be interrupted mid-run, short enough for make test
TASK = ["task=synth_multikey_dense", "task.loader.lengths=[4096]"]
GRID = [("snapkv", "uniform", "0.1"), ("snapkv", "uniform", "0.2"),
        ("streamingllm", "uniform", "0.1"), ("streamingllm", "uniform", "0.2")]  # Hydra's job order #0..#3


def _sh(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    res = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


@pytest.fixture(scope="module")
def slurm():
    """A running local Slurm cluster (started by the project's script)."""
    root, apt = os.geteuid() == 0, shutil.which("apt-get") is not None
    if not root and not (shutil.which("sinfo") and _sh("sinfo", check=False).returncode == 0):
        pytest.skip("Slurm is not running and cannot be started here: scripts/slurm_local.sh needs root")
    if root and not apt and not shutil.which("slurmctld"):
        pytest.skip("Slurm is not installed and cannot be (no apt-get); install slurmctld slurmd slurm-client munge")
    was_up = _sh("bash", str(SCRIPT), "status", check=False).stdout.count(": running") == 3
    if root:
        res = _sh("bash", str(SCRIPT), "up", check=False, timeout=600)
        if res.returncode == 3:  # the script never touches a slurm.conf it did not write
            pytest.skip(f"this machine has its own Slurm configuration: {res.stderr.strip()}")
        assert res.returncode == 0, f"scripts/slurm_local.sh up failed:\n{res.stdout}\n{res.stderr}"
    yield
    if root and not was_up:
        _sh("bash", str(SCRIPT), "stop", check=False)


def sweep(tmp_path: Path, name: str, *extra: str) -> subprocess.Popen:
    """``python -m kvbench -m hydra/launcher=slurm_localhost`` over GRID, in the background."""
    cmd = [sys.executable, "-m", "kvbench", "-m", "hydra/launcher=slurm_localhost", f"hydra.launcher.name={name}",
           "method=snapkv,streamingllm", "budget=0.1,0.2", *TASK, f"limit={LIMIT}",
           "progress=false", f"paths.results={tmp_path / 'results'}", f"paths.logs={tmp_path / 'logs'}", *extra]
    log = open(tmp_path / f"{name}-{time.time_ns()}.log", "w")  # noqa: SIM115 (the child writes to it)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)


def run_dir(tmp_path: Path, method: str, allocator: str, budget: str) -> Path:
    return (tmp_path / "results" / "synth_multikey_dense" / "kvbench-tiny" / method / allocator / "query_aware"
            / f"budget={budget}" / "seed=0")


def records(path: Path) -> list[dict]:
    file = path / "predictions.jsonl"
    return [json.loads(x) for x in file.read_text().splitlines() if x.strip()] if file.exists() else []


def job_ids(name: str) -> dict[int, str]:
    """Array index -> Slurm job id (the task's own id, squeue %A) of the running tasks of the sweep ``name``."""
    out = _sh("squeue", "-h", "-n", name, "-t", "RUNNING", "-o", "%A %i").stdout.splitlines()
    return {int(i.split("_")[1]): jid for jid, i in (line.split() for line in out) if "_" in i and "[" not in i}


def wait_sweep(proc: subprocess.Popen, name: str, timeout: float = 300) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _sh("scancel", "-n", name, check=False)
        raise


def reference(tmp_path: Path, method: str, budget: str) -> list[dict]:
    """The same configuration run uninterrupted, in this process."""
    from kvbench.runner import run

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={method}", f"budget={budget}", *TASK, f"limit={LIMIT}",
                                           "progress=false", f"paths.results={tmp_path / 'ref'}"])
    run(cfg)
    return records(Path(cfg.run_dir))


def answers(recs: list[dict]) -> list[tuple]:
    return [(r["id"], r["prediction"], r["scores"], r["kept_entries"]) for r in recs]


def task_pid(jid: str) -> int:
    """PID of the job's python process (task 0 of step 0) on this node."""
    rows = [r.split() for r in _sh("scontrol", "listpids", f"{jid}.0").stdout.splitlines()[1:]]
    return next(int(r[0]) for r in rows if r[2] == "0" and r[3] == "0")


def interrupt(how: str, jid: str) -> None:
    if how == "requeue":
        _sh("scontrol", "requeue", jid)
    else:  # the signal Slurm's slurmstepd would deliver to the task, delivered once, directly
        os.kill(task_pid(jid), getattr(signal, how))


# How each interrupted job of the grid is stopped mid-run (job #2 runs undisturbed). Signals go straight to the
# task: `scancel --signal` on an array task whose siblings are still pending gets "Job can not be altered now"
# from slurmctld 22.05 although it delivers the signal, and scancel then re-sends it for a minute.
INTERRUPTS = {
    # Slurm's warning before the time limit (--signal=USR2@signal_delay_s): submitit checkpoints and requeues the
    # job (max_num_timeout), and the requeued job resumes from its run directory
    0: "SIGUSR2",
    # preemption with PreemptMode=REQUEUE / a node drained for maintenance: Slurm kills the job and requeues it
    1: "requeue",
    # OOM killer: the job fails, the sweep reports it, resubmitting the sweep completes the run
    3: "SIGKILL",
}


def interrupt_mid_run(proc: subprocess.Popen, name: str, dirs: list[Path], jids: dict[int, str],
                      done: dict[int, int], timeout: float = 240) -> None:
    """Interrupt every job of INTERRUPTS as soon as it has answered its first question (all jobs are watched at
    once: the array's jobs run side by side, so waiting for them one after another lets a fast one finish)."""
    pending = dict(INTERRUPTS)
    end = time.monotonic() + timeout
    while pending:
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for jobs {sorted(pending)} to answer")
        if proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before jobs {sorted(pending)} answered")
        running = job_ids(name)
        for i in list(pending):
            n = len(records(dirs[i]))
            if n >= 1 and i in running:
                jids[i], done[i] = running[i], n
                interrupt(pending.pop(i), running[i])
        time.sleep(0.05)


def test_slurm_grid_survives_timeout_preemption_and_a_hard_kill(slurm, tmp_path) -> None:
    name = f"kvbench-test-{os.getpid()}-{time.time_ns() % 10**6}"
    dirs = [run_dir(tmp_path, *cell) for cell in GRID]
    proc = sweep(tmp_path, name)
    done_at_interrupt, jids = {}, {}
    try:
        interrupt_mid_run(proc, name, dirs, jids, done_at_interrupt)
        rc = wait_sweep(proc, name)
    finally:
        if proc.poll() is None:
            proc.kill()
            _sh("scancel", "-n", name, check=False)
    assert all(1 <= n < LIMIT for n in done_at_interrupt.values()), f"interrupted mid-run: {done_at_interrupt}"
    assert rc != 0, "the hard-killed job makes the sweep fail"
    assert [(d / "metrics.json").exists() for d in dirs] == [True, True, True, False]
    sweep_dir = next((tmp_path / "logs" / "sweeps").glob("*/*"))
    job0_log = (sweep_dir / "0" / "kvbench.log").read_text()
    assert "Requeued job" in job0_log and "Job completed successfully" in job0_log
    restarts = _sh("scontrol", "-o", "show", "job", jids[1]).stdout
    assert "Restarts=1" in restarts, restarts
    state = _sh("sacct", "-n", "-P", "-o", "State", "-j", jids[3]).stdout.split()
    assert state and state[0] in ("FAILED", "CANCELLED"), state
    assert _sh("squeue", "-h", "-n", name).stdout.strip() == "", "nothing of the first sweep is left running"

    # resubmitting the same sweep completes it: finished runs return at once, the killed one resumes
    mtimes = [(d / "metrics.json").stat().st_mtime_ns for d in dirs[:3]]
    assert wait_sweep(sweep(tmp_path, name), name) == 0
    assert [(d / "metrics.json").stat().st_mtime_ns for d in dirs[:3]] == mtimes, "finished runs are not redone"

    for (method, allocator, budget), d in zip(GRID, dirs, strict=True):
        recs = records(d)
        ids = [r["id"] for r in recs]
        assert len(ids) == len(set(ids)) == LIMIT, f"{d}: lost or duplicated samples"
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["n_samples"] == LIMIT and metrics["method"] == method and metrics["budget"] == float(budget)
        cfg = yaml.safe_load((d / "config.yaml").read_text())["config"]
        assert (cfg["method"]["name"], cfg["allocator"]["name"]) == (method, allocator)
    for i in INTERRUPTS:  # the interrupted runs answered exactly what an uninterrupted run answers
        ref = reference(tmp_path, GRID[i][0], GRID[i][2])
        assert sorted(answers(records(dirs[i]))) == sorted(answers(ref))
    submission = next(sweep_dir.glob(".submitit/*/*_submission.sh")).read_text()
    assert "#SBATCH --partition=debug" in submission and "#SBATCH --cpus-per-task=1" in submission


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf/hydra/launcher").glob("*.yaml")))
def test_every_launcher_option_composes_and_requeues_on_timeouts(name: str) -> None:
    """Each conf/hydra/launcher option composes over the plugin's own config (no cluster needed)."""
    from hydra.utils import get_class

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        hydra = compose("config", overrides=[f"hydra/launcher={name}"], return_hydra_config=True).hydra
    launcher = hydra.launcher
    cls = get_class(launcher._target_)
    assert cls.__module__.startswith("hydra_plugins.hydra_submitit_launcher")
    raw = OmegaConf.to_container(launcher, resolve=False)
    assert raw["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"  # job files next to the sweep's logs
    assert launcher.cpus_per_task >= 1
    if "Slurm" in cls.__name__:
        assert launcher.max_num_timeout > 0 and 0 < launcher.signal_delay_s < 60 * launcher.timeout_min

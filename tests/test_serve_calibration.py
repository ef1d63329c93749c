"""The cpu profile against reality: fitted on this machine from real kvbench-tiny runs, it predicts the TTFT and
per-token latency of real runs (one request; six requests served in turn) within 15 %: the full check in wall-clock
time (``slow``, ~1 min) and a quick one that CI runs (~10-20 s, shorter requests, the engine thread's CPU time)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_serve_helpers import serve_cfg

from kvbench.errors import UsageError
from kvbench.serve.calibrate import QUICK, calibrate, relative_errors, write_calibration
from kvbench.serve.copybench import measure
from kvbench.serve.run import run


def test_copy_cost_fit_separates_per_call_cost_from_bandwidth() -> None:
    fit = measure(block_bytes=32768, n_blocks=256, groups=(1, 4, 16, 64), repeats=5)
    assert fit.call_s > 0 and fit.bw > 1e8
    assert [r[0] for r in fit.rows] == [256, 64, 16, 4] and len({r[1] for r in fit.rows}) == 1  # same 8 MiB
    scattered, grouped = fit.rows[0], fit.rows[2]
    assert grouped[2] < scattered[2], "16 calls of 16 blocks are faster than 256 single-block calls"
    for calls, nbytes, t in fit.rows:  # two parameters for four measurements: within a factor 2 on a busy machine
        assert 0.5 < fit.predict(calls, nbytes) / t < 2, fit.rows


@pytest.mark.slow
def test_cpu_profile_predicts_real_runs_within_15_percent(tmp_path: Path) -> None:
    """Five interleaved calibration / validation rounds (~1 min). On a shared 2-core machine one re-measure is
    allowed when the load changes between rounds."""
    for _ in range(2):
        data = write_calibration(tmp_path / "cpu.json", rounds=5)
        errors = {name: relative_errors(rows) for name, rows in data["validation"].items()}
        if max(e for err in errors.values() for e in err.values()) <= 0.15:
            break
    for name, err in errors.items():
        assert err["ttft"] <= 0.15 and err["tpot"] <= 0.15, (name, err, data["validation"][name])


def test_cost_model_fitted_on_real_runs_predicts_other_real_runs_within_15_percent_quick() -> None:
    """CI's version of the check above: the same fit and the same comparison against real engine runs it was not
    fitted on (other prompt lengths; one request, and four served in turn), with QUICK's shorter prompts and outputs
    and 5 rounds. Timed in the engine thread's CPU time: on a shared CI box wall time swings with other jobs (4-5x
    at a load average of 9 on 2 cores), CPU time does not; the slow test checks wall time.
    Up to two re-measures (a full make test once saw 19 % TPOT on the first)."""
    for _ in range(3):
        data = calibrate(rounds=5, **QUICK, clock="cpu")
        errors = {name: relative_errors(rows) for name, rows in data["validation"].items()}
        if max(e for err in errors.values() for e in err.values()) <= 0.15:
            break
    assert set(errors) == {"single", "sequential"} and len(data["validation"]["sequential"]) == 4
    for name, err in errors.items():
        assert err["ttft"] <= 0.15 and err["tpot"] <= 0.15, (name, err, data["validation"][name])
    seq = data["validation"]["sequential"]
    assert all(a["ttft_measured_s"] < b["ttft_measured_s"] for a, b in zip(seq, seq[1:], strict=False))  # in turn


def test_cpu_profile_is_fitted_and_runs_the_embedded_workload(tmp_path: Path) -> None:
    """A missing calibration file is measured on first use (one quick round); the fit follows the prefill times,
    which grow with the prompt, and the simulator then serves the engine's way: one request at a time."""
    path = tmp_path / "cpu.json"
    m = run(serve_cfg("hardware=cpu", "workload=embedded", f"paths.results={tmp_path}",
                      f"hardware.calibration={path}", "hardware.rounds=1", "workload.n_requests=3"))
    data = __import__("json").loads(path.read_text())
    assert data["engine_kv_bytes_per_token"] == data["arch_kv_bytes_per_token"] == 2 * 3 * 2 * 64 * 4
    pre = [r for r in data["samples"] if r["prefill"]]
    assert [r["prefill"][0][0] for r in pre] == [64, 128, 256, 512, 1024, 1536, 2048]
    assert pre[-1]["measured_s"] > 4 * pre[0]["measured_s"]
    fitted = [r["fitted_s"] for r in pre]
    assert fitted == sorted(fitted)  # longer prompts, longer prefills
    err = sum(abs(r["fitted_s"] / r["measured_s"] - 1) for r in data["samples"]) / len(data["samples"])
    assert err < 0.3, f"one quick round: the fit is off by {100 * err:.0f} % on average"
    assert m["arch"] == "kvbench-tiny" and m["metrics"]["max_batch"] == 1
    assert m["metrics"]["n_requests"] == 3


def test_gpu_operator_benchmarks_write_a_calibration_a_profile_reads(tmp_path: Path) -> None:
    """The GPU calibration's code on CPU with small shapes: measured rates replace the profile's assumptions."""
    import subprocess
    import sys

    out = tmp_path / "a100.json"
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "scripts/calibrate_serve_gpu.py", "--device", "cpu", "--small", "--arch",
                        "kvbench-tiny", "--out", str(out)], capture_output=True, text=True, cwd=root, timeout=120)
    assert r.returncode == 0, r.stderr
    data = __import__("json").loads(out.read_text())
    assert data["measured"]["gemm_flops"] > 1e8 and data["measured"]["copy_call_s"] > 0
    cfg = serve_cfg("hardware=a100-80gb", f"+hardware.calibration={out}")
    from kvbench.serve.hardware import hardware_from_cfg

    hw = hardware_from_cfg(cfg.hardware)
    assert hw.name == "a100-80gb" and hw.gemm_flops == data["measured"]["gemm_flops"]
    assert hw.fixed_s == 0.004  # not measurable without an engine: the profile's
    missing = serve_cfg("hardware=a100-80gb", f"+hardware.calibration={tmp_path / 'none.json'}")
    with pytest.raises(UsageError, match="calibrate_serve_gpu.py"):
        hardware_from_cfg(missing.hardware, calibrate=lambda *a: None)

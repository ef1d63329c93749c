"""The VAR entry point: run(cfg) -> a run directory with metrics.json, and ``python -m kvbench.var``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kvbench.errors import UsageError
from kvbench.var.run import run

ROOT = Path(__file__).resolve().parents[1]
SMALL = ("task.seeds=[0]", "task.classes=[0,5]", "threads=1")


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["model=kvbench-tiny-var", "task=var_class", *overrides])


def test_hack_run_writes_metrics_and_images(tmp_path) -> None:
    cfg = composed("method=hack", "budget=0.3", f"paths.results={tmp_path}", *SMALL)
    metrics = run(cfg)
    out = tmp_path / "var_class" / "kvbench-tiny-var" / "hack" / "budget=0.3" / "seed=0"
    assert json.loads((out / "metrics.json").read_text())["score"] == metrics["score"]
    assert (out / "grid_seed0.png").exists() and len(list((out / "images").glob("*.png"))) == 2
    assert 0 < metrics["score"]["token_agreement"] < 1 and metrics["token_agreement_by_scale"][0] == 1.0
    assert metrics["peak_kv_bytes"] < metrics["full_peak_kv_bytes"]
    assert metrics["final_kv_bytes"] < 0.31 * metrics["full_final_kv_bytes"]
    assert len(metrics["attention_ms_by_scale"]) == 6 and metrics["inputs"]["hack_calibration"]
    assert run(cfg) == metrics, "a finished run is read back, not run again"


def test_fullkv_run_is_identical_to_its_reference(tmp_path) -> None:
    metrics = run(composed("method=fullkv", "budget=0.3", f"paths.results={tmp_path}", *SMALL))
    assert metrics["score"] == {"token_agreement": 1.0, "psnr": 100.0, "ssim": 1.0}
    assert metrics["identical_images"] == metrics["images"] == 2
    assert metrics["peak_kv_bytes"] == metrics["full_peak_kv_bytes"]


@pytest.mark.parametrize(("overrides", "message"), [
    (("model=kvbench-tiny",), "not a VAR model"),
    (("task=synth_needle",), "not a VAR task"),
    (("task.metrics=[fid]",), "torch-fidelity"),
    (("task.classes=[10]",), "classes must be in"),
    (("method=pyramidkv",), "no VAR version"),
    (("budget=[0.1,0.3]",), "one positive number"),
    (("model.pretrained=/nonexistent/var_d16.pth", "model.vae=/nonexistent/vae.pth", "model.depth=16"), "not found"),
    (("model.pretrained=/nonexistent/var_d16.pth",), "model.vae"),
    (("model.dtype=bfloat16",), "float32"),
    (("budget=-1",), "one positive number"),
])
def test_bad_inputs_are_one_clear_error(tmp_path, overrides, message) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        small = () if "task=synth_needle" in overrides else SMALL
        cfg = compose("config", overrides=["model=kvbench-tiny-var", "task=var_class", "method=hack", *small,
                                           f"paths.results={tmp_path}", *overrides])
    with pytest.raises(UsageError, match=message):
        run(cfg)
    assert not list(tmp_path.rglob("*")), "nothing written before the inputs are checked"


def test_cli(tmp_path) -> None:
    res = subprocess.run([sys.executable, "-m", "kvbench.var", "method=streamingllm", "budget=0.5", *SMALL,
                          f"paths.results={tmp_path}", f"paths.logs={tmp_path / 'logs'}", "model=kvbench-tiny-var",
                          "task=var_class"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "agreement  tokens" in res.stdout and "both CFG streams" in res.stdout


def run_dir_of(tmp_path: Path, method: str = "hack") -> Path:
    return tmp_path / "var_class" / "kvbench-tiny-var" / method / "budget=0.3" / "seed=0"


def test_the_run_directory_records_its_inputs_and_refuses_others(tmp_path) -> None:
    """kvbench.results.RunStore: config hash, method input files and model identity in config.yaml; a finished
    run of another calibration file or another config is refused naming what differs; overwrite=true reruns."""
    import shutil

    import yaml

    from kvbench.results import ConfigMismatchError
    from kvbench.var.load import ASSETS

    cal = tmp_path / "cal.json"
    shutil.copy(ASSETS / "kvbench-tiny-var" / "hack_calibration.json", cal)
    args = ("method=hack", "budget=0.3", f"method.calibration={cal}", f"paths.results={tmp_path / 'r'}", *SMALL)
    first = run(composed(*args))
    stored = yaml.safe_load((run_dir_of(tmp_path / "r") / "config.yaml").read_text())
    assert stored["inputs"]["hack_calibration"] == first["inputs"]["hack_calibration"]
    assert stored["model"]["local"] and len(stored["config_hash"]) == 16
    cal.write_text(cal.read_text().replace('"settings"', '"note": "recalibrated", "settings"'))
    with pytest.raises(ConfigMismatchError, match="other input files .*hack_calibration"):
        run(composed(*args))
    with pytest.raises(ConfigMismatchError, match="differing keys: .*task.cfg"):
        run(composed(*args, "task.cfg=2.0"))
    again = run(composed(*args, "overwrite=true"))
    assert again["inputs"]["hack_calibration"] != first["inputs"]["hack_calibration"]
    assert run(composed(*args)) == again, "the rerun's inputs are now the recorded ones"


def test_a_run_directory_held_by_another_process_is_refused(tmp_path) -> None:
    from kvbench.results import RunDirBusyError, RunStore

    holder = RunStore(run_dir_of(tmp_path, "fullkv"), {})
    holder.lock()
    try:
        with pytest.raises(RunDirBusyError, match="another process"):
            run(composed("method=fullkv", "budget=0.3", f"paths.results={tmp_path}", *SMALL))
    finally:
        holder.unlock()
    assert not (run_dir_of(tmp_path, "fullkv") / "config.yaml").exists()

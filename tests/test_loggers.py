"""logger=wandb: offline files next to (never instead of) the local results; disabled and failures never block."""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from kvbench.errors import UsageError
from kvbench.loggers import WandbLogger, log_run, make_logger
from kvbench.results import config_hash
from kvbench.runner import run

ROOT = Path(__file__).resolve().parents[1]
matplotlib.use("Agg")


def cfg_for(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["limit=1", "progress=false", f"paths.results={tmp_path / 'results'}",
                                            f"paths.logs={tmp_path / 'logs'}", *overrides])


def wait_for(path: Path, needle: bytes, timeout: float = 60) -> bytes:
    """The file's bytes once they contain ``needle`` (wandb-core writes the run log asynchronously)."""
    end = time.monotonic() + timeout
    while True:
        data = path.read_bytes() if path.exists() else b""
        if needle in data or time.monotonic() > end:
            return data
        time.sleep(0.2)


def offline_runs(wandb_dir: Path) -> list[Path]:
    return sorted((wandb_dir / "wandb").glob("offline-run-*"))


def test_default_is_no_logger_and_logger_is_not_part_of_the_config_hash(tmp_path) -> None:
    plain = cfg_for(tmp_path)
    assert plain.logger.name == "none" and make_logger(plain.logger) is None
    wandb_cfg = cfg_for(tmp_path, "logger=wandb")
    resolve = OmegaConf.to_container
    assert config_hash(resolve(plain, resolve=True)) == config_hash(resolve(wandb_cfg, resolve=True))
    with pytest.raises(UsageError, match="logger='nosuch'"):
        make_logger({"name": "nosuch"})


def test_offline_run_writes_wandb_files_and_the_local_results(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = cfg_for(tmp_path, "logger=wandb", "method=snapkv", "budget=0.2")
    assert cfg.logger.mode == "offline" and cfg.logger.dir == str(tmp_path / "wandb_dir")
    metrics = run(cfg)
    assert (Path(cfg.run_dir) / "metrics.json").exists()
    runs = offline_runs(tmp_path / "wandb_dir")
    assert len(runs) == 1 and runs[0].name.endswith(metrics["config_hash"])  # deterministic wandb run id
    log = wait_for(runs[0] / f"run-{metrics['config_hash']}.wandb", b"score/exact_match")
    assert b"score/exact_match" in log and b"kv_bytes_kept" in log and b"defensivekv" not in log
    assert b"snapkv" in log  # the config
    assert list((runs[0] / "files" / "media" / "table").glob("predictions_*.table.json"))


def test_disabled_mode_writes_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = cfg_for(tmp_path, "logger=wandb")
    run(cfg)
    assert (Path(cfg.run_dir) / "metrics.json").exists() and not offline_runs(tmp_path / "wandb_dir")


def test_an_unreachable_server_is_a_warning_not_a_failure(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    cfg = cfg_for(tmp_path, "logger=wandb", "logger.mode=online", "logger.init_timeout=5",
                  f"logger.dir={tmp_path / 'w'}")
    start = time.monotonic()
    with pytest.warns(UserWarning, match="wandb logging failed"):
        log_run(cfg, {"config_hash": "abc", "score": {"exact_match": 1.0}})
    assert time.monotonic() - start < 60


def test_report_tables_and_figures_offline(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    png = tmp_path / "curve.png"
    fig.savefig(png)
    logger = WandbLogger({"name": "wandb", "project": "kvbench-test", "dir": str(tmp_path / "w"),
                          "mode": "offline"})
    logger.log_report("report", {"table": pd.DataFrame({"method": ["snapkv"], "ta": [75.0]})}, {"curve": png})
    (run_dir,) = offline_runs(tmp_path / "w")
    assert list((run_dir / "files" / "media" / "table").glob("table_*.table.json"))
    assert list((run_dir / "files" / "media" / "images").glob("curve_*.png"))


def test_report_cli_wandb_settings_come_from_the_logger_yaml(tmp_path, monkeypatch) -> None:
    from kvbench.report.__main__ import wandb_logger

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("KVBENCH_LOGS", str(tmp_path / "logs"))
    logger = wandb_logger("proj", None)
    assert logger.s["mode"] == "offline" and logger.s["project"] == "proj"
    assert logger.s["dir"] == str(tmp_path / "logs" / "wandb") and logger.s["init_timeout"] == 15
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wd"))
    assert wandb_logger(None, "disabled").s == {**logger.s, "project": "kvbench", "mode": "disabled",
                                                "dir": str(tmp_path / "wd")}

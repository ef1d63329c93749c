"""Offline wandb runs say where they are and how to upload them: ``logger=wandb`` runs and ``report --wandb``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("wandb")

from test_report_figures import write_run  # noqa: E402

from kvbench.loggers import WandbLogger  # noqa: E402
from kvbench.report.__main__ import main  # noqa: E402


def synced_dir(err: str) -> Path:
    """The directory named by the printed ``wandb sync <dir>`` command (checked to be the printed location)."""
    where = re.search(r"wandb: offline run in (\S+)", err)
    sync = re.search(r"wandb: upload it with: wandb sync (\S+)", err)
    assert where and sync and where.group(1) == sync.group(1), err
    return Path(sync.group(1))


def test_an_offline_run_prints_its_directory_and_the_sync_command(tmp_path, capsys) -> None:
    logger = WandbLogger({"name": "wandb", "project": "kvbench-test", "dir": str(tmp_path / "w"), "mode": "offline"})
    logger.log_run({"run_id": "ta/m/snapkv"}, {"config_hash": "0123456789abcdef", "score": {"exact_match": 50.0}},
                   [])
    path = synced_dir(capsys.readouterr().err)
    assert path.is_dir() and path.parent == tmp_path / "w" / "wandb" and path.name.startswith("offline-run-")
    assert path.name.endswith("0123456789abcdef")  # the config hash is the wandb run id


def test_disabled_mode_prints_nothing(tmp_path, capsys) -> None:
    logger = WandbLogger({"name": "wandb", "dir": str(tmp_path / "w"), "mode": "disabled"})
    logger.log_run({"run_id": "x"}, {"config_hash": "abc"}, [])
    assert "wandb sync" not in capsys.readouterr().err


def test_report_wandb_prints_where_the_offline_run_is(tmp_path, monkeypatch, capsys) -> None:
    root = tmp_path / "results"
    write_run(root, "ta", "fullkv", 1.0, [1, 1])
    write_run(root, "ta", "snapkv", 0.2, [1, 0])
    write_run(root, "ta", "snapkv", 0.5, [1, 1])
    monkeypatch.setenv("KVBENCH_LOGS", str(tmp_path / "logs"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    assert main([str(root), "--formats", "png", "--wandb"]) == 0
    path = synced_dir(capsys.readouterr().err)
    assert path.parent == tmp_path / "logs" / "wandb" / "wandb" and list(path.glob("run-*.wandb"))

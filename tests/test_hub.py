"""Offline data access: local files through ``datasets``, one clear message (no retry loop) when data is missing."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvbench.tasks import hub

ROOT = Path(__file__).resolve().parents[1]


def test_data_root_convention(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(hub.DATA_ENV, raising=False)
    assert hub.data_root() == Path("data")
    monkeypatch.setenv(hub.DATA_ENV, str(tmp_path))
    assert hub.data_root() == tmp_path
    assert hub.data_root("/x/y") == Path("/x/y")


def test_load_local_reads_jsonl_through_datasets(tmp_path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"input": f"q{i}", "answers": [str(i)], "length": i}) + "\n" for i in range(3)))
    ds = hub.load_local(path)
    assert ds.column_names == ["input", "answers", "length"] and ds[2] == {"input": "q2", "answers": ["2"], "length": 2}


def test_offline_env_is_detected_without_a_probe(monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub.offline_env() and not hub.hub_reachable()


def test_missing_hub_dataset_offline_fails_at_once_with_the_prepare_command(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(hub.DataMissingError) as err:
        hub.load_hub_dataset("some-org/never-cached-dataset", "0" * 40, benchmark="mybench", name="cfg")
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "some-org/never-cached-dataset/cfg@" in msg and "python scripts/prepare_data.py mybench" in msg


def test_missing_local_copy_names_the_path(tmp_path) -> None:
    with pytest.raises(hub.DataMissingError, match=str(tmp_path / "nope")):
        hub.load_hub_dataset("org/ds", "main", benchmark="b", data_dir=tmp_path / "nope")


def test_fetch_offline_fails_with_the_prepare_command(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.DataMissingError, match="prepare_data.py longbench"):
        hub.fetch_hub_files("THUDM/LongBench", "main", ["data.zip"], tmp_path, benchmark="longbench")


def test_prepare_script_lists_discovered_benchmarks() -> None:
    res = subprocess.run([sys.executable, "scripts/prepare_data.py", "--list"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert any(line.startswith("longbench ") for line in res.stdout.splitlines())  # discovered, not registered
    bad = subprocess.run([sys.executable, "scripts/prepare_data.py", "nosuchbench"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "unknown benchmark 'nosuchbench'" in bad.stderr

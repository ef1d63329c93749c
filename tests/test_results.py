"""Run-directory store: config hash check, resume after a half-written line, atomic metrics, loading."""

from __future__ import annotations

import json

import pytest

from kvbench.results import ConfigMismatchError, RunStore, config_hash, load_results

CFG = {"task": {"name": "t"}, "model": {"name": "m"}, "method": {"name": "snapkv", "window": 32}, "budget": 0.2,
       "paths": {"results": "/a"}, "limit": None, "seed": 0}


def test_hash_ignores_volatile_keys_but_not_method_params() -> None:
    assert config_hash(CFG) == config_hash({**CFG, "paths": {"results": "/elsewhere"}, "limit": 3})
    assert config_hash(CFG) != config_hash({**CFG, "method": {"name": "snapkv", "window": 8}})
    assert config_hash(CFG) != config_hash({**CFG, "budget": 0.5})


def test_changed_config_is_refused_with_the_differing_keys(tmp_path) -> None:
    RunStore(tmp_path, CFG).open()
    other = {**CFG, "method": {"name": "snapkv", "window": 8}}
    with pytest.raises(ConfigMismatchError, match="method.window"):
        RunStore(tmp_path, other).open()
    RunStore(tmp_path, {**CFG, "limit": 5}).open()  # volatile keys do not count
    replaced = RunStore(tmp_path, other)
    replaced.discard()  # overwrite=true replaces the old run
    replaced.open()
    assert "window: 8" in (tmp_path / "config.yaml").read_text()


def test_partial_last_line_is_dropped_and_appends_continue(tmp_path) -> None:
    store = RunStore(tmp_path, CFG)
    store.open()
    store.append({"id": "a"})
    store.append({"id": "b"})
    with open(store.predictions_path, "a") as f:
        f.write('{"id": "c", "predic')  # killed mid-write
    before = store.predictions_path.read_bytes()
    assert store.done_ids() == {"a", "b"}
    assert store.predictions_path.read_bytes() == before, "a reader never changes the file"
    store.append({"id": "c"})  # the writer cuts the partial line before appending
    assert [r["id"] for r in store.records()] == ["a", "b", "c"]


def test_metrics_written_atomically_and_loaded(tmp_path) -> None:
    run_dir = tmp_path / "t" / "m" / "snapkv"
    store = RunStore(run_dir, CFG)
    store.open()
    assert not store.complete
    store.append({"id": "a", "scores": {"exact_match": 1.0}})
    store.write_metrics({"score": {"exact_match": 100.0}, "kept_fraction": 0.2})
    assert store.complete and not list(run_dir.glob("*.tmp"))
    assert json.loads(store.metrics_path.read_text())["kept_fraction"] == 0.2
    df = load_results(tmp_path)
    assert len(df) == 1 and df.loc[0, "score.exact_match"] == 100.0 and df.loc[0, "method.window"] == 32
    per_sample = load_results(tmp_path, samples=True)
    assert per_sample.loc[0, "scores.exact_match"] == 1.0

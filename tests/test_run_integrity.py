"""Runs you can trust: overwrite never destroys before success, readers never write, unreadable files are one clear
message (and the report/status go on), the stored hash is checked, duplicates count once, and a run's identity
covers its data and model files. Everything through the real ``run(cfg)`` or the real CLIs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from kvbench.errors import UsageError
from kvbench.models import ModelLoadError
from kvbench.report.status import scan
from kvbench.results import ConfigMismatchError, CorruptRunError, RunStore, load_results
from kvbench.runner import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "kvbench" / "assets" / "kvbench-tiny"
LOCOMO = ROOT / "tests" / "fixtures" / "longconvqa"


def config(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.results={root}", "progress=false", "method=snapkv",
                                            "task=synth_needle", "limit=2", *overrides])


def files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".lock"}


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines()]


# -- overwrite: nothing destroyed before the new run has loaded and claimed the directory ---------------------
def test_overwrite_with_a_config_that_fails_to_load_keeps_the_finished_run(tmp_path) -> None:
    cfg = config(tmp_path)
    metrics = run(cfg)
    run_dir = Path(cfg.run_dir)
    before = files(run_dir)
    with pytest.raises(ModelLoadError, match="does not exist"):
        run(config(tmp_path, "overwrite=true", "model.pretrained=/no/such/model"))
    assert files(run_dir) == before, "a typo in the model path must not delete the finished run"
    with pytest.raises(UsageError, match="unknown synthetic kind"):
        run(config(tmp_path, "overwrite=true", "task.loader.kind=haystack"))
    assert files(run_dir) == before
    assert run(cfg) == metrics  # still finished


def test_overwrite_replaces_the_run_once_the_new_one_has_claimed_it(tmp_path) -> None:
    run(config(tmp_path))
    cfg = config(tmp_path, "overwrite=true", "method.window=8")
    run(cfg)
    run_dir = Path(cfg.run_dir)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["config"]["method"]["window"] == 8
    assert not (run_dir / ".overwritten").exists() and len(lines(run_dir)) == 2


def test_old_files_moved_aside_by_a_killed_overwrite_come_back(tmp_path) -> None:
    cfg = config(tmp_path)
    metrics = run(cfg)
    run_dir = Path(cfg.run_dir)
    before = files(run_dir)
    aside = run_dir / ".overwritten"
    aside.mkdir()
    for name in before:  # what a process killed between moving the old run aside and claiming leaves
        (run_dir / name).rename(aside / name)
    assert run(cfg) == metrics and files(run_dir) == before and not aside.exists()


def test_a_failure_never_writes_error_json_into_a_finished_run(tmp_path) -> None:
    cfg = config(tmp_path)
    run(cfg)
    run_dir = Path(cfg.run_dir)
    with pytest.raises(UsageError, match="limit must be"):
        run(config(tmp_path, "limit=abc"))
    assert not (run_dir / "error.json").exists()
    assert scan(tmp_path).state.tolist() == ["finished"]


# -- readers never write --------------------------------------------------------------------------------------
def test_readers_leave_a_partial_last_line_in_place(tmp_path) -> None:
    cfg = config(tmp_path)
    run(cfg)
    pred = Path(cfg.run_dir) / "predictions.jsonl"
    with open(pred, "a") as f:
        f.write('{"id": "needle-x/q0", "predic')  # a writer appending right now
    before = pred.read_bytes()
    assert len(load_results(tmp_path, samples=True)) == 2
    assert len(load_results(tmp_path)) == 1
    assert scan(tmp_path).n_predictions.tolist() == [2]
    assert len(RunStore(cfg.run_dir, {}).records()) == 2
    assert pred.read_bytes() == before, "loading results must not change predictions.jsonl"


# -- unreadable files: one message naming file, line and fix; report and status go on -----------------------
def corrupt_second_line(run_dir: Path) -> None:
    pred = run_dir / "predictions.jsonl"
    text = pred.read_text().splitlines()
    text[1] = text[1][:40]
    pred.write_text("\n".join(text) + "\n")


def test_a_corrupt_prediction_line_is_one_message_naming_file_line_and_fix(tmp_path) -> None:
    cfg = config(tmp_path)
    run(cfg)
    run_dir = Path(cfg.run_dir)
    (run_dir / "metrics.json").unlink()
    corrupt_second_line(run_dir)
    with pytest.raises(CorruptRunError, match=r"predictions.jsonl: line 2 cannot be parsed.*delete that line"):
        run(cfg)
    res = subprocess.run([sys.executable, "-m", "kvbench", f"paths.results={tmp_path}", "progress=false",
                          "method=snapkv", "task=synth_needle", "limit=2", f"paths.logs={tmp_path / 'logs'}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "predictions.jsonl: line 2" in res.stderr and "overwrite=true" in res.stderr


@pytest.mark.parametrize(("name", "garbage"), [("config.yaml", "config: [unclosed\n"), ("metrics.json", "{\"score\": "),
                                               ("error.json", "{oops")])
def test_report_and_status_skip_a_corrupt_run_with_a_warning_and_go_on(tmp_path, name, garbage) -> None:
    run(config(tmp_path, "budget=0.1"))
    bad = config(tmp_path, "budget=0.2")
    run(bad)
    bad_dir = Path(bad.run_dir)
    if name == "error.json":
        (bad_dir / "metrics.json").unlink()
    (bad_dir / name).write_text(garbage)
    if name == "error.json":  # an unfinished run: not loaded, nothing to warn about
        runs = load_results(tmp_path)
    else:
        with pytest.warns(UserWarning, match=name):
            runs = load_results(tmp_path)
    assert runs.budget.tolist() == [0.1]
    with pytest.warns(UserWarning, match=name):
        st = scan(tmp_path)
    states = dict(zip(st.run_id.str.extract(r"budget=([0-9.]+)")[0], st.state, strict=True))
    assert states == {"0.1": "finished", "0.2": "corrupt"}
    res = subprocess.run([sys.executable, "-m", "kvbench.report", str(tmp_path), "--formats", "png",
                          "--resamples", "50"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert name in res.stderr or name == "error.json"  # the report reads finished runs only
    res = subprocess.run([sys.executable, "-m", "kvbench.report", "status", str(tmp_path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 1 and "1 finished" in res.stdout and "1 corrupt" in res.stdout
    if name != "error.json":
        with pytest.raises(CorruptRunError, match=name):
            run(bad)


def test_a_hand_edited_config_body_is_refused(tmp_path) -> None:
    cfg = config(tmp_path)
    run(cfg)
    path = Path(cfg.run_dir) / "config.yaml"
    stored = yaml.safe_load(path.read_text())
    stored["config"]["method"]["window"] = 4  # the hash no longer matches the body
    path.write_text(yaml.safe_dump(stored, sort_keys=False))
    with pytest.raises(CorruptRunError, match="does not match its config_hash"):
        run(cfg)
    with pytest.warns(UserWarning, match="config_hash"):
        assert load_results(tmp_path).empty


def test_a_duplicated_question_counts_once_the_last_complete_line_winning(tmp_path) -> None:
    cfg = config(tmp_path, "limit=3")
    metrics = run(cfg)
    run_dir = Path(cfg.run_dir)
    recs = lines(run_dir)
    twin = {**recs[0], "scores": {"exact_match": 1.0 - recs[0]["scores"]["exact_match"]}}
    with open(run_dir / "predictions.jsonl", "a") as f:
        f.write(json.dumps(twin) + "\n")
    (run_dir / "metrics.json").unlink()
    with pytest.warns(UserWarning, match="1 question"):
        again = run(cfg)
    assert again["n_questions"] == metrics["n_questions"] == 3 and again["n_duplicates"] == 1
    expected = 100 * (sum(r["scores"]["exact_match"] for r in recs[1:]) + twin["scores"]["exact_match"]) / 3
    assert again["score"]["exact_match"] == pytest.approx(expected)


# -- identity: data and model files ---------------------------------------------------------------------------
def locomo(root: Path, data: Path, *extra: str):
    return config(root, "task=longconvqa/locomo", f"task.loader.data_dir={data}", "limit=1",
                  "task.max_new_tokens=2", *extra)


def test_other_data_under_the_same_config_is_refused_naming_the_difference(tmp_path) -> None:
    first, other = tmp_path / "d1", tmp_path / "d2"
    shutil.copytree(LOCOMO, first)
    shutil.copytree(LOCOMO, other)
    data = json.loads((other / "locomo10.json").read_text())
    data[0]["qa"][0]["answer"] = "something else"
    (other / "locomo10.json").write_text(json.dumps(data))
    root = tmp_path / "results"
    metrics = run(locomo(root, first))
    with pytest.raises(ConfigMismatchError, match="the task's data differ in 1 of the first 1 samples"):
        run(locomo(root, other))
    with pytest.raises(UsageError, match="locomo10.json"):  # no data at all: the loader's message, not old scores
        run(locomo(root, tmp_path / "missing"))
    shutil.copytree(first, tmp_path / "moved")
    assert run(locomo(root, tmp_path / "moved")) == metrics  # the same data elsewhere is the same run


def test_other_model_files_under_the_same_config_are_refused(tmp_path) -> None:
    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    args = ("model=hf", f"model.pretrained={model}", "model.name=tiny", "model.chat_template=false")
    cfg = config(tmp_path / "results", *args)
    metrics = run(cfg)
    (model / "README.md").write_text("a new model card")  # documentation is not the model
    assert run(cfg) == metrics
    weights = model / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-8:] = bytes(8)  # other weights under the same path
    weights.write_bytes(bytes(raw))
    with pytest.raises(ConfigMismatchError, match="model directory's files differ"):
        run(cfg)
    recorded = yaml.safe_load((Path(cfg.run_dir) / "config.yaml").read_text())
    assert set(recorded) >= {"config_hash", "config", "inputs", "data", "model"} and "local" in recorded["model"]


# -- model files that cannot be loaded ------------------------------------------------------------------------
def test_empty_or_corrupt_model_directories_are_one_clear_message(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="is empty: it is not a Hugging Face model directory"):
        run(config(tmp_path / "r", "model=hf", f"model.pretrained={tmp_path / 'empty'}"))
    broken = tmp_path / "broken"
    shutil.copytree(TINY, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="look corrupt or incomplete"):
        run(config(tmp_path / "r", "model=hf", f"model.pretrained={broken}", "model.chat_template=false"))
    assert not list((tmp_path / "r").rglob("config.yaml")), "a model that cannot load claims no directory"


def test_a_hub_model_is_identified_by_its_revision_and_commit(monkeypatch, tmp_path) -> None:
    from kvbench.identity import model_difference, model_identity

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    pinned = model_identity("org/name", "a" * 40)
    assert pinned == {"hub": "org/name", "revision": "a" * 40, "commit": "a" * 40}
    unknown = model_identity("org/name", "main")  # not cached: the commit is learnt when the model loads
    assert unknown["commit"] is None and model_difference(pinned, unknown) is None
    other = {**pinned, "commit": "b" * 40}
    assert "hub commit differs" in model_difference(pinned, other)
    assert "source differs" in model_difference({"local": "x"}, pinned)

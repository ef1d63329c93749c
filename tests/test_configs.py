"""Every conf/ option composes and instantiates; names match file stems; the CLI lists and rejects clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from kvbench.budget import Allocator
from kvbench.method import Method

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def options(group: str) -> list[str]:
    """Every option of a group, subfolders included (``task=ruler/niah_single_1``)."""
    return sorted(p.relative_to(CONF / group).with_suffix("").as_posix() for p in (CONF / group).rglob("*.yaml"))


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("name", options("method"))
def test_every_method_composes_and_instantiates(name: str) -> None:
    cfg = composed(f"method={name}", "budget=0.2")
    method = instantiate(cfg.method)
    assert isinstance(method, Method) and method.name == name == cfg.method.name
    assert isinstance(instantiate(cfg.allocator), Allocator)
    module = type(method).__module__  # a variant (e.g. cake_nocascade) is a yaml over another method's file
    assert module.startswith("methods.") and (ROOT / "methods" / f"{module[8:]}.py").exists(), \
        "a method is methods/<name>.py + conf/method/<name>.yaml"
    assert type(method).__doc__ and ("http" in type(method).__doc__ or name == "fullkv"), "link the paper/code"


@pytest.mark.parametrize("name", options("allocator"))
def test_every_allocator_composes(name: str) -> None:
    cfg = composed(f"allocator={name}")
    assert instantiate(cfg.allocator).name == name == cfg.allocator.name


@pytest.mark.parametrize("name", options("model"))
def test_every_model_option_has_the_loader_keys(name: str) -> None:
    cfg = composed(f"model={name}")
    if cfg.model._get_node("pretrained")._is_missing():  # a template that needs model.pretrained (model=hf)
        cfg = composed(f"model={name}", "model.pretrained=Qwen/Qwen2.5-7B-Instruct")
        assert cfg.model.name == "Qwen--Qwen2.5-7B-Instruct"
        assert composed(f"model={name}", "model.pretrained=/data/models/my-llama").model.name == "my-llama"
    else:
        assert cfg.model.name == name
    for key in ("pretrained", "revision", "dtype", "attn_implementation", "max_length", "chat_template"):
        assert key in cfg.model, f"model/{name}.yaml lacks {key}"


@pytest.mark.parametrize("name", options("task"))
def test_every_task_composes_and_loads(name: str) -> None:
    from kvbench.models import load_tokenizer
    from kvbench.tasks import load_samples, needs_tokenizer
    from kvbench.tasks.hub import DataMissingError

    cfg = composed(f"task={name}", "paths.data=/nonexistent/kvbench-data")
    assert cfg.task.name == name
    if cfg.task.get("family") == "var":  # image generation (kvbench.var): classes and seeds, no samples
        from kvbench.var.task import VarTask

        try:
            assert VarTask.from_cfg(cfg.task, num_classes=1000).seeds
        except DataMissingError as err:  # GenEval's metadata file: the one offline message, with the command
            assert "/nonexistent/kvbench-data" in str(err) and "scripts/prepare_data.py" in str(err)
        return
    tok = load_tokenizer(cfg.model) if needs_tokenizer(cfg.task) else None
    try:
        samples = load_samples(cfg.task, limit=2, tokenizer=tok)
    except DataMissingError as err:  # benchmark data is not in CI: the one offline message, with the command
        assert "/nonexistent/kvbench-data" in str(err) and "scripts/prepare_data.py" in str(err)
        return
    assert len(samples) == 2 and all(s.questions for s in samples)


def test_method_defaults_pick_their_allocator_and_the_command_line_wins() -> None:
    assert composed("method=pyramidkv").allocator.name == "pyramid"
    assert composed("method=adakv").allocator.name == "head_adaptive"
    assert composed("method=defensivekv").allocator.name == "flat"
    assert composed("method=pyramidkv", "allocator=uniform").allocator.name == "uniform"


def test_run_dir_is_deterministic_and_results_root_configurable(monkeypatch) -> None:
    cfg = composed("method=snapkv", "budget=0.1", "paths.results=/scratch/r")
    assert cfg.run_dir == "/scratch/r/synth_multikey_dense/kvbench-tiny/snapkv/uniform/query_aware/budget=0.1/seed=0"
    monkeypatch.setenv("KVBENCH_RESULTS", "/env/root")
    assert composed().run_dir.startswith("/env/root/")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvbench", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_help_lists_models_methods_tasks() -> None:
    out = _cli("--help").stdout
    for group in ("method", "model", "task", "allocator"):
        assert f"{group}:" in out
    for name in options("method") + options("model") + options("task"):
        folder, _, option = name.rpartition("/")  # task subfolders are listed as "task/<folder>: <options>"
        line = next(li for li in out.splitlines() if li.startswith(f"task/{folder}:" if folder else "task:")) \
            if name in options("task") else out
        assert option in line
    assert "task=ruler/niah_single_1" in out, "the help says how to pick a task in a subfolder"


@pytest.mark.parametrize("group", ["method", "model", "task", "allocator"])
def test_unknown_option_lists_the_valid_ones(group: str) -> None:
    res = _cli(f"{group}=nosuchthing")
    assert res.returncode != 0
    assert "nosuchthing" in res.stderr and all(m in res.stderr for m in options(group))


def test_multirun_grid_runs_locally(tmp_path) -> None:
    res = _cli("-m", "method=snapkv,adakv", "budget=0.1,0.2", "limit=1", "progress=false",
               f"paths.results={tmp_path / 'results'}", f"paths.logs={tmp_path / 'logs'}")
    assert res.returncode == 0, res.stderr[-2000:]
    done = sorted(p.parent.relative_to(tmp_path / "results").as_posix()
                  for p in (tmp_path / "results").rglob("metrics.json"))
    assert done == [f"synth_multikey_dense/kvbench-tiny/{m}/{a}/query_aware/budget={b}/seed=0"
                    for m, a in (("adakv", "head_adaptive"), ("snapkv", "uniform")) for b in ("0.1", "0.2")]
    assert list((tmp_path / "logs" / "sweeps").glob("*/*/multirun.yaml")), "Hydra's files go to paths.logs"

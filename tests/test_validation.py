"""Validation before anything heavy, and containment: every bad top-level value is one clear error within seconds,
through the real CLI, before torch or transformers are imported and before any directory is claimed; nothing is
ever written outside ``paths.results``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kvbench import model_slug
from kvbench.errors import UsageError
from kvbench.runner import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "kvbench" / "assets" / "kvbench-tiny"

# runs the CLI in this interpreter and reports whether torch / transformers were imported on the way
PROBE = """
import runpy, sys
sys.argv = ["kvbench", *sys.argv[1:]]
try:
    runpy.run_module("kvbench", run_name="__main__", alter_sys=True)
except SystemExit as err:
    print("EXIT", err.code)
print("IMPORTED", "torch" in sys.modules, "transformers" in sys.modules)
"""


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, f"paths.results={tmp_path / 'results'}",
                           f"paths.logs={tmp_path / 'logs'}", "progress=false", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.results={tmp_path / 'results'}", "progress=false", "limit=1",
                                            *overrides])


BAD = [
    ("seed=abc", "seed must be a whole number"),
    ("seed=-1", "seed must be a whole number"),
    ("limit=abc", "limit must be a positive number"),
    ("limit=0", "limit must be a positive number"),
    ("threads=abc", "threads must be a positive number"),
    ("device=tpu", "device='tpu'; choose auto, cpu"),
    ("overwrite=maybe", "overwrite must be true or false"),
    ("prefill_chunk=0", "prefill_chunk must be a positive number"),
    ("protocol=sometimes", "protocol='sometimes'; choose one of query_aware, query_agnostic"),
    ("budget=abc", "budget must be a number"),
    ("budget=[0.1,0.1]", "names a budget twice"),
    ("+task.truncation=middle", "task.truncation='middle'"),
]


@pytest.mark.parametrize(("override", "message"), BAD)
def test_a_bad_top_level_value_is_one_error_before_torch_loads_and_claims_nothing(tmp_path, override, message):
    t0 = time.perf_counter()
    res = cli(tmp_path, override)
    assert "EXIT 2" in res.stdout, res.stderr[-2000:]
    assert "IMPORTED False False" in res.stdout, "validation must come before torch/transformers are imported"
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvbench: error: ") and message in err[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "results").exists(), "a rejected config claims no directory"
    assert time.perf_counter() - t0 < 60


def test_help_answers_without_torch(tmp_path) -> None:
    res = cli(tmp_path, "--help")
    assert "IMPORTED False False" in res.stdout and "kvbench" in res.stdout


def test_run_validates_every_key_before_claiming(tmp_path) -> None:
    for override, message in BAD[:8]:
        with pytest.raises(UsageError, match=message.split("'")[0]):
            run(config(tmp_path, override))
    assert not (tmp_path / "results").exists()


ESCAPES = [
    ("method.name=../../../escaped", "method.name"),
    ("method.name=/tmp/escaped", "method.name"),
    ("method.name=a/b", "method.name"),
    ("method.name=..", "method.name"),
    ("method.name=.hidden", "method.name"),
    ("method.name='snap\u2215kv'", "DIVISION SLASH"),  # a look-alike slash
    ("method.name='snap\u202ekv'", "RIGHT-TO-LEFT OVERRIDE"),
    ("method.name='snap\u200bkv'", "ZERO WIDTH SPACE"),
    ("allocator.name=../x", "allocator.name"),
    ("model.name=..", "model.name"),
    ("model.name=../../x", "model.name"),
    ("task.name=../../x", "task.name"),
    ("task.name=/etc/x", "task.name"),
    ("task.name=synth//x", "task.name"),
]


@pytest.mark.parametrize(("override", "message"), ESCAPES)
def test_a_name_that_would_leave_the_results_root_is_refused(tmp_path, override, message) -> None:
    with pytest.raises(UsageError, match=message):
        run(config(tmp_path, override))
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing written, inside or outside the root"


def test_the_cli_refuses_an_escaping_method_name_and_writes_nothing_outside(tmp_path) -> None:
    res = cli(tmp_path, "method.name=../../../../escaped", "limit=1")
    assert "EXIT 2" in res.stdout and "cannot name a run directory" in res.stderr
    assert not list(tmp_path.rglob("escaped")) and not (tmp_path / "results").exists()


def test_run_dir_outside_the_results_root_is_refused(tmp_path) -> None:
    with pytest.raises(UsageError, match="not inside paths.results"):
        run(config(tmp_path, f"run_dir={tmp_path / 'elsewhere'}"))
    assert not (tmp_path / "elsewhere").exists()


def test_a_local_model_path_ending_in_dotdot_is_named_after_the_directory_it_resolves_to(tmp_path) -> None:
    shutil.copytree(TINY, tmp_path / "tiny")
    (tmp_path / "tiny" / "sub").mkdir()
    path = f"{tmp_path / 'tiny' / 'sub'}/.."
    assert model_slug(path) == "tiny" and model_slug("/") == "" and model_slug("./.x") == "_x"
    cfg = config(tmp_path, "model=hf", f"model.pretrained={path}", "model.chat_template=false")
    assert cfg.model.name == "tiny"
    metrics = run(cfg)
    run_dir = Path(cfg.run_dir).resolve()
    assert metrics["n_questions"] == 1 and run_dir.is_relative_to((tmp_path / "results").resolve())
    assert run_dir.parts[-6] == "tiny"

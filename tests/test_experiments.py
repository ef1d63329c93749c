"""Experiment configs (conf/experiment/*.yaml, `-m +experiment=<name>`): every cell of every paper grid composes,
validates and instantiates; an experiment runs as a sweep, and command-line values replace its grid."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from kvbench.budget import check_budget
from kvbench.report.status import scan
from kvbench.results import config_hash
from kvbench.runner import build, validate

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
GROUPS = {p.name for p in CONF.iterdir() if p.is_dir()}


def composed(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def grid(name: str) -> dict[str, list[str]]:
    """The experiment's sweep as {key: [value, ...]} (a list budget stays one value: one job, shared prefill)."""
    params = composed(f"+experiment={name}", hydra=True).hydra.sweeper.params or {}
    parser = OverridesParser.create()
    out = {}
    for key, value in params.items():
        override = parser.parse_override(f"{key}={value}")
        out[key] = list(override.sweep_string_iterator()) if override.is_sweep_override() else [
            override.get_value_element_as_str()]
    return out


def test_there_are_paper_grids() -> None:
    assert {"longbench_main", "synth_budget_curve", "needle_grid"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_cell_of_the_experiment_composes_and_validates(name: str) -> None:
    sweep = grid(name)
    assert sweep, f"experiment/{name}.yaml pins no grid (hydra.sweeper.params)"
    missing = sorted({f"{k}/{v}" for k, vs in sweep.items() if k in GROUPS for v in vs
                      if not (CONF / k / f"{v}.yaml").exists()})
    needs_longbench = bool(missing) and all(m.startswith("task/longbench/") for m in missing)
    assert needs_longbench or not missing, f"experiment/{name} names options that do not exist: {missing}"
    if needs_longbench:
        sweep.pop("task")  # check the rest of the grid on the default task
    keys = list(sweep)
    for values in itertools.product(*(sweep[k] for k in keys)):
        cell = [f"{k}={v}" for k, v in zip(keys, values, strict=True)]
        cfg = composed(f"+experiment={name}", *cell)
        budgets = list(cfg.budget) if OmegaConf.is_list(cfg.budget) else [cfg.budget]
        one = composed(f"+experiment={name}", *cell, f"budget={budgets[0]}")
        validate(one)
        assert all(check_budget(b) > 0 for b in budgets)
        assert build(one.method, "method").name == one.method.name
        build(one.allocator, "allocator")
    if needs_longbench:
        pytest.skip(f"experiment/{name} needs the LongBench tasks, not in this checkout ({', '.join(missing[:2])}, "
                    "...); the rest of its grid composes and validates")


def test_an_experiment_runs_as_a_sweep_and_the_command_line_narrows_it(tmp_path) -> None:
    res = subprocess.run([sys.executable, "-m", "kvbench", "-m", "+experiment=needle_grid", "method=snapkv",
                          "limit=1", "progress=false", f"paths.results={tmp_path / 'r'}",
                          f"paths.logs={tmp_path / 'l'}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    done = sorted(p.parent.relative_to(tmp_path / "r").as_posix() for p in (tmp_path / "r").rglob("metrics.json"))
    assert done == [f"synth_needle/kvbench-tiny/snapkv/uniform/query_aware/budget={b}/seed=0"
                    for b in ("0.05", "0.1", "0.2")]  # one job: the experiment's budgets, only snapkv
    (sweep,) = {p.parent for p in (tmp_path / "l").rglob("multirun.yaml")}
    st = scan(tmp_path / "r", sweep)  # status re-expands the experiment's grid, narrowed by the command line
    assert st[["job", "state"]].values.tolist() == [[0, "finished"]] * 3 and sorted(st.run_id) == done


def _runs_of_cell(name: str, cell: list[str]) -> list[tuple[str, str]]:
    """(run_dir, config hash) of the runs one grid cell writes for the first method of a ``methods`` grid (the
    method's name is a level of every run directory), each budget of a budget list."""
    methods = [c for c in cell if c.startswith("methods=")]
    rest = [c for c in cell if not c.startswith("methods=")]
    first = [f"method={methods[0].split('=', 1)[1].strip('[]').split(',')[0]}"] if methods else []
    cfg = composed(f"+experiment={name}", *rest, *first)
    out = []
    for budget in list(cfg.budget) if OmegaConf.is_list(cfg.budget) else [cfg.budget]:
        cfg.budget = budget
        out.append((str(cfg.run_dir), config_hash(OmegaConf.to_container(cfg, resolve=True))))
    return out


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_no_two_runs_of_an_experiment_share_a_run_directory(name: str) -> None:
    """Two cells that differ in any hashed key (e.g. only in task.loader.lengths) get their own directories;
    sharing one would be refused as a config mismatch halfway through the grid."""
    sweep = grid(name)
    if any(k == "task" and not (CONF / "task" / f"{v}.yaml").exists() for k, vs in sweep.items() for v in vs):
        sweep.pop("task")  # the LongBench tasks are not in this checkout
    keys = list(sweep)
    owner: dict[str, str] = {}
    for values in itertools.product(*(sweep[k] for k in keys)):
        for run_dir, digest in _runs_of_cell(name, [f"{k}={v}" for k, v in zip(keys, values, strict=True)]):
            assert owner.setdefault(run_dir, digest) == digest, f"two configurations of {name} share {run_dir}"
    assert owner

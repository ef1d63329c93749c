"""The run directories behind the README's real-model RULER tables, committed under ``docs/runs``
(``+experiment=real_tiny_ruler``): each is the run the experiment writes today (same directory, same config hash,
so ``KVBENCH_RESULTS=docs/runs`` resumes and extends them), and every block ``scripts/real_ruler_table.py`` prints
from them that the README shows is in the README exactly as printed (no figure typed by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import initialize_config_dir
from omegaconf import OmegaConf

from kvbench.results import config_hash, read_config
from kvbench.sweep import budget_configs, compose_config, method_configs

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "docs" / "runs"
sys.path.insert(0, str(ROOT / "scripts"))
import real_ruler_table  # noqa: E402  (a script, not a module of the package)


def committed() -> list[Path]:
    return sorted(RUNS.rglob("config.yaml"))


def experiment_runs(cfg: dict) -> dict[tuple[str, float], tuple[str, str]]:
    """{(method, budget): (run_id, config hash)} of the runs the experiment's job for the cell of ``cfg`` writes
    (composed as the sweep composes the job, then split by the method grid as the job splits it)."""
    job = ["+experiment=real_tiny_ruler", f"model={cfg['model']['name']}", f"task={cfg['task']['name']}",
           f"protocol={cfg['protocol']}", f"task.loader.lengths=[{cfg['task']['loader']['lengths'][0]}]",
           "methods=[fullkv,streamingllm,snapkv,pyramidkv,adakv,defensivekv]", "budget=[0.1,0.2,0.5]"]
    out = {}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name, method_cfg in method_configs(compose_config(job), job).items():
            for budget, one in budget_configs(method_cfg).items():
                out[name, budget] = (str(one.run_id), config_hash(OmegaConf.to_container(one, resolve=True)))
    return out


def test_every_committed_run_is_the_experiments_own_run() -> None:
    paths = committed()
    assert paths, "docs/runs holds no run directory"
    cells: dict[tuple, dict[tuple[str, float], tuple[str, str]]] = {}
    for path in paths:
        stored = read_config(path)  # a readable config whose hash matches it
        cfg = stored["config"]
        key = (cfg["model"]["name"], cfg["task"]["name"], cfg["protocol"], str(cfg["task"]["loader"]["lengths"]))
        if key not in cells:
            cells[key] = experiment_runs(cfg)
        run_id, digest = cells[key][cfg["method"]["name"], float(cfg["budget"])]
        assert path.parent.relative_to(RUNS).as_posix() == run_id == cfg["run_id"], path
        assert stored["config_hash"] == digest, (f"{path}: the experiment's config for this run changed since it "
                                                 "ran; rerun or migrate docs/runs")


def test_the_readme_shows_the_committed_blocks_as_the_script_prints_them() -> None:
    readme = (ROOT / "README.md").read_text()
    df = real_ruler_table.samples(str(RUNS))
    shown = 0
    for (model, length, protocol), grp in df.groupby(real_ruler_table.KEYS, sort=True):
        header = f"**{model}, {int(length)} tokens, {protocol}**"
        if header in readme:
            assert f"{header}\n\n{real_ruler_table.block(grp).to_markdown(floatfmt='.1f')}\n" in readme, header
            shown += 1
    assert shown, "the README shows no block of the committed runs"

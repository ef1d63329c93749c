"""A non-editable install (``pip install <path>``) runs the main job and the Python API from outside the checkout.

About 40 s on a loaded CPU box (a wheel build plus a run), so ``slow``: ``make test-install`` (and ``.ci/run``) runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = (".git", ".venv*", "results", "logs", "build", "*.egg-info", "__pycache__", "tests", "notebooks", "data")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package built from a copy of this checkout and installed with ``pip install --target`` (no deps: the
    venv's torch and transformers serve it)."""
    tmp = tmp_path_factory.mktemp("install")
    src, site = tmp / "src", tmp / "site"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*SKIP))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(src)], check=True, capture_output=True, text=True)
    return site


def python(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "KVBENCH_RESULTS": str(cwd / "results"),
           "KVBENCH_LOGS": str(cwd / "logs")}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_installed_package_runs_the_main_job_from_another_directory(installed, tmp_path) -> None:
    where = python(installed, tmp_path, "-c", "import kvbench, methods, kvbench.cli as c; "
                   "print(kvbench.__file__, methods.__file__, c.CONF_DIR, kvbench.methods.names()[:2])")
    assert where.returncode == 0, where.stderr
    assert where.stdout.split()[:3] == [str(installed / "kvbench/__init__.py"), str(installed / "methods/__init__.py"),
                                        str(installed / "conf")]
    out = python(installed, tmp_path, "-m", "kvbench", "method=defensivekv", "budget=0.2", "limit=2", "progress=false")
    assert out.returncode == 0, out.stderr
    run_dir = tmp_path / "results/synth_multikey_dense/kvbench-tiny/defensivekv/flat/query_aware/budget=0.2/seed=0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n_questions"] == 2 and metrics["kept_fraction"] == pytest.approx(0.2, abs=0.01)
    assert f"run dir    {run_dir.relative_to(tmp_path)}" in out.stdout or str(run_dir) in out.stdout


@pytest.mark.slow
def test_the_installed_package_answers_through_the_python_api(installed, tmp_path) -> None:
    code = ("import torch, kvbench, kvbench.cli; from omegaconf import OmegaConf; "
            "from kvbench.models import load_model; "
            "m, t = load_model(OmegaConf.load(kvbench.cli.CONF_DIR / 'model/kvbench-tiny.yaml'), torch.device('cpu')); "
            "ids = t('alice k17 k4 k92 . bob k5 k6 k7 . alice', return_tensors='pt').input_ids\n"
            "for b in (1.0, 0.5):\n"
            "    with kvbench.compress(m, 'snapkv', budget=b, window=4) as kv:\n"
            "        out = m.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:]\n"
            "    print(t.decode(out), '|', kv.prefill['kept_fraction'])")
    out = python(installed, tmp_path, "-c", code)
    assert out.returncode == 0, out.stderr
    full, half = out.stdout.strip().splitlines()
    assert full == "k17 k4 k92 . | 1.0"  # the embedded model's induction answer, uncompressed
    assert half.endswith("| 0.5")

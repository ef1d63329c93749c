"""notebooks/analysis.ipynb runs top to bottom (nbclient) on a results root made of real tiny runs
(``kvbench.runner.run`` on the embedded model with ``limit=``); it is committed without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from hydra import compose, initialize_config_dir
from nbclient import NotebookClient

from kvbench.report import load_results
from kvbench.runner import run

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "analysis.ipynb"
# (task, limit): 4 needle cells at 512 tokens (depths 0-30 %), 2 multikey contexts at 1024 tokens
TASKS = (("synth_needle", 4), ("synth_multikey", 2))
GRID = [("fullkv", 1.0)] + [(m, b) for m in ("snapkv", "streamingllm") for b in (0.1, 0.5)]


@pytest.fixture(scope="module")
def results_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for task, limit in TASKS:
            for method, budget in GRID:
                run(compose("config", overrides=[f"task={task}", f"limit={limit}", f"method={method}",
                                                 f"budget={budget}", "progress=false", f"paths.results={root}"]))
    return root


def test_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    source = "\n".join(c.source for c in code)
    assert "from kvbench.report import" in source and "open(" not in source and "json" not in source


def test_notebook_runs_on_real_results(results_root, monkeypatch) -> None:
    runs = load_results(results_root)
    assert len(runs) == len(TASKS) * len(GRID)
    assert set(runs[runs.method == "fullkv"].main_score) == {100.0}  # the embedded model retrieves everything
    monkeypatch.setenv("KVBENCH_RESULTS", str(results_root))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
                   ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    # curves (1) + Pareto memory/latency (2) + needle heatmaps at budgets 0.1 and 0.5 (2)
    assert len(pngs) == 5
    texts = json.dumps([o.get("data", {}).get("text/markdown", "") for o in outputs])
    assert "% of full" in texts and "synth_needle" in texts and "streamingllm" in texts

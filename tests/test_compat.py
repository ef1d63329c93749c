"""One execution path and one compatibility check: the runner, the budget sweep and the lm-eval bridge refuse the
same combinations with the same message; capabilities are declared on classes; no import cycles between the
runner and the sweep, or between the protocols' shared leaf and the episodic protocol."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import load_method
from hydra import compose, initialize_config_dir

from kvbench.compat import ENGINE_DEFAULT, IncompatibleError, ModelCapabilities, check_compatible
from kvbench.errors import UsageError
from kvbench.protocols import REGISTRY, SELECTABLE
from kvbench.protocols import get as get_protocol
from kvbench.runner import run

ROOT = Path(__file__).resolve().parents[1]
KV = ROOT / "kvbench"


def imports(path: Path) -> set[str]:
    """Every kvbench module a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_import_cycles_between_runner_and_sweep_or_pipeline_and_episodic() -> None:
    assert not any(m.startswith("kvbench.runner") for m in imports(KV / "sweep.py"))
    assert not any(m.startswith("kvbench.episodic") for m in imports(KV / "pipeline.py"))
    assert not any(m.startswith(("kvbench.runner", "kvbench.sweep")) for m in imports(KV / "episodic.py"))
    registry = imports(KV / "protocols.py")  # the registry names implementations; it imports none of them
    assert not any(m.startswith(("kvbench.pipeline", "kvbench.episodic", "torch")) for m in registry)


FLAGS = {"episodic", "cascading", "decode_evict", "cross_layer", "equal_heads", "shares_prefill", "prepare"}


@pytest.mark.parametrize("path", ["runner.py", "sweep.py", "pipeline.py", "episodic.py", "compat.py", "lmeval.py"])
def test_capabilities_are_declared_not_probed(path: str) -> None:
    """No hasattr, and no getattr of a capability flag: they are ClassVars on Method/Allocator (the allocator's
    ``check_method`` hook is still looked up in compat.py until budget.py declares it; see the module)."""
    calls = [node for node in ast.walk(ast.parse((KV / path).read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    assert not [c for c in calls if c.func.id == "hasattr"]
    probes = [c for c in calls if c.func.id == "getattr" and len(c.args) > 1
              and isinstance(c.args[1], ast.Constant) and c.args[1].value in FLAGS]
    assert not probes, f"{path} probes {[ast.unparse(c) for c in probes]}"


def test_every_registered_protocol_resolves_and_the_selectable_ones_are_named() -> None:
    assert SELECTABLE == ("query_aware", "query_agnostic")
    for name in REGISTRY:
        assert callable(get_protocol(name))


def config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"paths.results={tmp_path}", "progress=false", "limit=1", *overrides])


CONFLICTS = [  # (overrides, message) refused by the runner, a sweep and the lm-eval bridge alike
    (("method=epicache", "protocol=query_aware"), "run it with protocol=query_agnostic"),
    (("method=snapkv", "allocator=error_aware"), "allocator=error_aware needs method=compresskv"),
]


@pytest.mark.parametrize(("overrides", "message"), CONFLICTS)
def test_the_runner_and_the_sweep_refuse_the_same_combinations_before_claiming(tmp_path, overrides, message):
    with pytest.raises(UsageError, match=message):
        run(config(tmp_path, *overrides))
    with pytest.raises(UsageError, match=message):
        run(config(tmp_path, *overrides, "budget=[0.1,0.2]"))
    assert not tmp_path.exists() or not list(tmp_path.rglob("config.yaml"))


@pytest.mark.parametrize(("overrides", "message"), CONFLICTS[1:])
def test_the_lm_eval_bridge_refuses_what_the_runner_refuses(overrides, message) -> None:
    pytest.importorskip("lm_eval")
    from kvbench.lmeval import KVBenchLM

    kwargs = dict(o.split("=", 1) for o in overrides)
    with pytest.raises((IncompatibleError, UsageError), match=message):
        KVBenchLM(pretrained="kvbench-tiny", **kwargs)


@pytest.mark.parametrize("overrides", [("method=cake", "prefill_chunk=64"), ("method=adakv", "prefill_chunk=64")])
def test_the_bridge_accepts_what_the_runner_accepts(overrides) -> None:
    """Block-wise prefill with cross-layer (CAKE) and head-adaptive (AdaKV) allocators: both front ends run it."""
    pytest.importorskip("lm_eval")
    from kvbench.lmeval import KVBenchLM

    kwargs = dict(o.split("=", 1) for o in overrides)
    kwargs["prefill_chunk"] = int(kwargs["prefill_chunk"])
    KVBenchLM(pretrained="kvbench-tiny", **kwargs)


def test_the_model_part_of_the_check_is_a_declared_capability() -> None:
    method, allocator = load_method("adakv")
    no_ragged = ModelCapabilities("some-family", ragged_blockwise_prefill=False)
    with pytest.raises(IncompatibleError, match="for some-family models"):
        check_compatible(method, allocator, "query_aware", 64, no_ragged)
    check_compatible(method, allocator, "query_aware", 64, ENGINE_DEFAULT)  # every adapter family supports it
    check_compatible(method, allocator, "query_aware", None, no_ragged)


def records(run_dir: str) -> list[dict]:
    import json

    drop = {"prefill_s", "compress_s", "question_s", "decode_s_per_token", "peak_mem_bytes"}
    lines = (Path(run_dir) / "predictions.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in lines]


def test_a_sweep_without_a_shared_prefill_runs_each_budget_like_a_run_of_one(tmp_path) -> None:
    """cake (cascading, cross-layer) falls back to budget after budget over one loaded model, with a fresh method
    and allocator per budget: the same records as separate runs (a single budget is a sweep of one)."""
    common = ("method=cake", "limit=2", "task=synth_needle")
    swept = run(config(tmp_path / "sweep", *common, "budget=[0.1,0.3]"))
    for b in (0.1, 0.3):
        one = config(tmp_path / "one", *common, f"budget={b}")
        alone = run(one)
        assert alone["score"] == swept[b]["score"] and alone["kept_fraction"] == swept[b]["kept_fraction"]
        assert records(one.run_dir) == records(config(tmp_path / "sweep", *common, f"budget={b}").run_dir)

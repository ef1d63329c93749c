"""CompressKV: SRH scoring and error-aware budgets on hand-made numbers, one shared token set per layer in the engine,
calibration files (kvbench's and the authors' format), and the calibration script end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, CONF_DIR, HEAD_DIM, N_HEADS, N_KV_HEADS, N_LAYERS, ROOT, build_model, load_method
from hydra import compose, initialize_config_dir

from kvbench.budget import tokens_per_head
from kvbench.engine import Engine
from kvbench.engine.context import LayerContext
from kvbench.errors import UsageError
from methods.compresskv import (
    CALIBRATION_DIR,
    MEMO_KEY,
    CompressKV,
    ErrorAware,
    error_aware_budgets,
    load_calibration,
    srh_scores,
)

N = 200


# ---------------------------------------------------------------------------------------------------------------
# token scoring by the semantic retrieval heads (hand-made attention)
# ---------------------------------------------------------------------------------------------------------------
def test_srh_scores_use_only_the_chosen_heads_summed_pooled_and_averaged():
    attn = torch.zeros(4, 2, 8)  # (H_q, w, m)
    attn[0, :, 5] = 0.5  # head 0 looks at token 5 (both window rows)
    attn[1, :, 3] = 0.9  # head 1 (not chosen) looks at token 3, the strongest of all
    attn[2, 0, 1], attn[2, 1, 1] = 0.3, 0.4  # head 2 looks at token 1
    s = srh_scores(attn, [2, 0], kernel=1)
    assert torch.allclose(s, torch.tensor([0, 0.35, 0, 0, 0, 0.5, 0, 0]))  # mean over heads of the row sums
    assert s.topk(2).indices.tolist() == [5, 1]  # token 3 is ignored: its head is not a retrieval head
    assert s.topk(1).indices.tolist() == [5]
    assert srh_scores(attn, [2], kernel=1).argmax() == 1  # first_k = 1: the top head alone decides

    pooled = srh_scores(attn, [0], kernel=5)  # avg-pool 5, zero padding counted: 1.0 / 5 around token 5
    assert torch.allclose(pooled, torch.tensor([0, 0, 0, 0.2, 0.2, 0.2, 0.2, 0.2]))


def _context(q, k, layer=0, n_layers=2, window=2, name="tiny-random-llama"):
    module = SimpleNamespace(config=SimpleNamespace(_name_or_path=name))
    n = k.shape[1]
    return LayerContext(layer_idx=layer, n_layers=n_layers, module=module, queries=q, keys=k, values=k.clone(),
                        positions=torch.arange(n), window=window, keep=6, scaling=q.shape[-1] ** -0.5)


def _calibration(tmp_path, heads, scores, name="tiny-random-llama"):
    data = {"format": "kvbench.compresskv.calibration", "version": 1, "model": {"name": name},
            "srh": {"ranking": heads}, "layer_error": {"scores": scores}}
    (tmp_path / f"{name}.json").write_text(json.dumps(data))
    return tmp_path / f"{name}.json"


def test_method_score_matches_a_reference_and_is_shared_by_every_kv_head(tmp_path):
    torch.manual_seed(0)
    q, k = torch.randn(4, 12, 8), torch.randn(2, 12, 8)  # H_q = 4, H_kv = 2, n = 12, d = 8
    heads = [[3, 0, 1, 2], [1, 2, 3, 0]]
    path = _calibration(tmp_path, heads, [0.5, 0.5])
    method = CompressKV(window=2, kernel=3, first_k=2, calibration=str(path))
    ctx = _context(q, k, layer=0)
    s = method.score(ctx)  # (H_kv, n - w)
    # reference, written from the authors' description: window queries of heads 3 and 0 against their KV heads
    ref = []
    for h in (3, 0):
        logits = q[h, -2:] @ k[h // 2].T / math.sqrt(8)  # (w, n)
        logits[0, -1] = float("-inf")  # causal inside the window
        a = logits.softmax(-1)[:, :-2].sum(0)  # (n - w,)
        ref.append(F.avg_pool1d(a[None, None], 3, stride=1, padding=1, count_include_pad=True)[0, 0])
    assert s.shape == (2, 10) and torch.equal(s[0], s[1])
    torch.testing.assert_close(s[0], torch.stack(ref).mean(0))
    assert ctx.memo[MEMO_KEY] == [0.5, 0.5]


# ---------------------------------------------------------------------------------------------------------------
# error-aware layer budgets (hand-made error scores, the authors' semantics)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("u", "total", "lo", "hi", "expected"),
    [
        # 32 each, R = 204 split as round(102) / round(61.2) / round(40.8): sums exactly
        ([0.5, 0.3, 0.2], 300, 32, 300, [134, 93, 73]),
        # 23.33 each rounds down: one token short, given to the highest u (a tie: the lower layer)
        ([1 / 3, 1 / 3, 1 / 3], 100, 10, 1000, [34, 33, 33]),
        # round half to even (np.round): 2.5 -> 2 for all four, two short: +1 to layers 0 and 1 (tied u)
        ([0.25, 0.25, 0.25, 0.25], 50, 10, 100, [13, 13, 12, 12]),
        # 3.4 -> 3, 8.5 -> 8 (half to even), 5.1 -> 5: one short, the +1 goes to the highest u (layer 1), not layer 0
        ([0.2, 0.5, 0.3], 32, 5, 100, [8, 14, 10]),
        # 3.5 -> 4, 3.5 -> 4, 3 -> 3 overshoots by one: -1 from the lowest u first
        ([0.35, 0.35, 0.3], 40, 10, 100, [14, 14, 12]),
        # layer 0 clipped at the cap 150; the 82 left are cycled +1 over layers 1 and 2 (equal u: lower first)
        ([0.98, 0.01, 0.01], 300, 32, 150, [150, 75, 75]),
        # a zero score keeps the floor
        ([0.0, 1.0], 100, 32, 96, [32, 68]),
        # floor * L above the total (can only happen with a floor > B): -1 until every layer is at the floor
        ([0.5, 0.5], 50, 32, 96, [32, 32]),
    ],
)
def test_error_aware_budgets(u, total, lo, hi, expected):
    assert error_aware_budgets(u, total, lo, hi) == expected


def test_error_aware_budgets_keep_the_total_within_bounds():
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        u = torch.rand(32, generator=g) ** 3
        u = (u / u.sum()).tolist()
        b = [32, 64, 100, 128, 333, 1024][trial % 6]
        out = error_aware_budgets(u, b * 32, min(32, b), 3 * b)
        assert sum(out) == b * 32 and min(out) >= min(32, b) and max(out) <= 3 * b


def test_error_aware_allocator_counts_one_size_per_layer_minus_the_window():
    ctx = _context(torch.zeros(4, 12, 8), torch.zeros(2, 200, 8), layer=1, n_layers=3, window=8)
    ctx.keep = 50  # B = 50 tokens per head: total 150, floor 32, cap 150
    ctx.memo[MEMO_KEY] = [0.2, 0.5, 0.3]  # R = 54 -> 11, 27, 16 -> [43, 59, 48]
    counts = ErrorAware().allocate(torch.zeros(2, 192), 42, 1, 3, ctx=ctx)
    assert counts.tolist() == [59 - 8, 59 - 8]
    ctx.keep = 20  # below the floor: min(32, B) = 20 for every layer, so nothing is left to share
    assert ErrorAware().allocate(torch.zeros(2, 192), 12, 1, 3, ctx=ctx).tolist() == [12, 12]
    ctx.memo.clear()
    with pytest.raises(UsageError, match="compresskv"):
        ErrorAware().allocate(torch.zeros(2, 192), 42, 1, 3, ctx=ctx)
    with pytest.raises(UsageError, match="method=compresskv"):
        ErrorAware().check_method(load_method("snapkv")[0])


# ---------------------------------------------------------------------------------------------------------------
# in the engine: every architecture, several budgets
# ---------------------------------------------------------------------------------------------------------------
def _prefill(model, method, allocator, budget, seed=0):
    ids = torch.randint(0, 128, (N,), generator=torch.Generator().manual_seed(seed))
    with Engine(model, method, allocator, budget=budget) as eng:
        eng.reset()
        eng.forward(ids, compress=True)
        heads = [[ly.head(h)[2].tolist() for h in range(ly.n_heads)] for ly in eng.store.layers]
        return heads, eng.store.nbytes()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("budget", [0.5, 0.3, 0.1, 64])
def test_shared_token_set_and_error_aware_counts(tiny_model, arch, budget):
    method, allocator = load_method("compresskv")
    heads, nbytes = _prefill(tiny_model(arch), method, allocator, budget)
    cal = method.load(f"tiny-random-{arch}", N_LAYERS, N_HEADS)
    b = tokens_per_head(budget, N)
    expected = [min(x, N) for x in error_aware_budgets(cal.layer_scores, b * N_LAYERS, min(32, b), 3 * b)]
    for layer, per_head in enumerate(heads):
        assert all(h == per_head[0] for h in per_head), "one token set per layer, identical across KV heads"
        assert len(per_head[0]) == expected[layer]
        assert per_head[0][-8:] == list(range(N - 8, N)), "the 8-token window is kept"
    assert nbytes == sum(expected) * N_KV_HEADS * HEAD_DIM * 4 * 2
    if max(expected) < N:
        assert sum(expected) == N_LAYERS * b


def test_uniform_allocator_and_first_k_change_what_is_kept(tiny_model):
    model = tiny_model("llama")
    method, _ = load_method("compresskv")
    _, uniform = load_method("snapkv")
    heads, _ = _prefill(model, method, uniform, 0.2)
    assert [len(h[0]) for h in heads] == [40, 40]
    one, _ = load_method("compresskv", ("method.first_k=1",))
    assert _prefill(model, one, uniform, 0.2)[0] != heads, "the top retrieval head alone selects differently"


def test_budget_one_keeps_everything(tiny_model):
    method, allocator = load_method("compresskv")
    heads, _ = _prefill(tiny_model("qwen3"), method, allocator, 1.0)
    assert all(h == list(range(N)) for layer in heads for h in layer)


# ---------------------------------------------------------------------------------------------------------------
# calibration files
# ---------------------------------------------------------------------------------------------------------------
def test_shipped_calibration_of_the_embedded_model_finds_its_induction_head():
    cal = load_calibration(CALIBRATION_DIR / "kvbench-tiny.json")
    cal.check(3, 4)
    assert cal.heads[1][0] == 0, "kvbench-tiny's induction head is query head 0 of layer 1 (model card)"
    assert math.isclose(sum(cal.layer_scores), 1.0, abs_tol=1e-5) and min(cal.layer_scores) >= 0
    assert cal.meta["settings"]["srh"]["seed"] != 0 and cal.meta["settings"]["layer_error"]["seed"] != 0


def test_missing_or_mismatched_calibration_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KVBENCH_CALIBRATION_DIR", raising=False)
    with pytest.raises(UsageError, match="calibrate_compresskv.py"):
        CompressKV().load("org/unknown-model", 2, 4)
    with pytest.raises(UsageError, match="method.calibration"):
        CompressKV().load("", 2, 4)
    with pytest.raises(UsageError, match="3 layers"):
        CompressKV().load("kvbench-tiny", 2, 4)
    with pytest.raises(UsageError, match="no such file"):
        CompressKV(calibration=str(tmp_path / "nope.json"))
    with pytest.raises(UsageError, match="kv_head"):
        CompressKV(cache="query_head")
    (tmp_path / "bad.json").write_text("{\"x\": 1}")
    with pytest.raises(UsageError, match="neither"):
        load_calibration(tmp_path / "bad.json")
    monkeypatch.setenv("KVBENCH_CALIBRATION_DIR", str(tmp_path))
    _calibration(tmp_path, [[0, 1, 2, 3]] * 2, [0.5, 0.5], name="org--my-model")
    assert CompressKV().load("org/my-model", 2, 4).heads == [[0, 1, 2, 3]] * 2


def test_authors_files_load_through_the_adapter(tmp_path, tiny_model):
    """The authors' scores/<model>_head_idx.json + <model>_layer_score.jsonl (one pretty-printed JSON object)."""
    (tmp_path / "m_head_idx.json").write_text(json.dumps({"0": [2, 0, 1, 3], "1": [3, 1, 2, 0]}))
    (tmp_path / "m_layer_score.jsonl").write_text(json.dumps({"qasper": [0.3, 0.7], "avg_score": [0.25, 0.75]},
                                                             indent=2))
    cal = load_calibration(tmp_path / "m_head_idx.json", tmp_path / "m_layer_score.jsonl")
    assert cal.heads == [[2, 0, 1, 3], [3, 1, 2, 0]] and cal.layer_scores == [0.25, 0.75]
    overrides = (f"method.calibration={tmp_path / 'm_head_idx.json'}",
                 f"method.layer_scores={tmp_path / 'm_layer_score.jsonl'}")
    method, allocator = load_method("compresskv", overrides)
    heads, _ = _prefill(tiny_model("mistral"), method, allocator, 0.5)
    assert [len(h[0]) for h in heads] == error_aware_budgets([0.25, 0.75], 200, 32, 300)
    method, allocator = load_method("compresskv", overrides[:1])  # heads only: no error scores
    with pytest.raises(UsageError, match="error scores"):
        _prefill(tiny_model("mistral"), method, allocator, 0.5)


# ---------------------------------------------------------------------------------------------------------------
# the calibration script end to end, and the CLI runner
# ---------------------------------------------------------------------------------------------------------------
def _script():
    spec = importlib.util.spec_from_file_location("calibrate_compresskv", ROOT / "scripts" / "calibrate_compresskv.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path, *overrides):
    from kvbench.runner import run

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["method=compresskv", "task=synth_needle", "limit=2", "progress=false",
                                           f"paths.results={tmp_path / 'results'}", *overrides])
    return run(cfg)


def test_calibration_script_on_the_embedded_model_feeds_the_method(tmp_path):
    out = _script().main(["--out", str(tmp_path / "tiny.json"), "--srh-lengths", "256", "--srh-depths", "0.3", "0.7",
                          "--error-lengths", "256", "--error-samples", "1", "--error-steps", "3"])
    data = json.loads(out.read_text())
    assert data["model"]["name"] == "kvbench-tiny" and data["srh"]["n_counted"] == 2
    assert data["srh"]["ranking"][1][0] == 0, "the induction head ranks first in layer 1"
    assert out.read_text() == _script().main(["--out", str(tmp_path / "again.json"), "--srh-lengths", "256",
                                              "--srh-depths", "0.3", "0.7", "--error-lengths", "256",
                                              "--error-samples", "1", "--error-steps", "3"]).read_text(), \
        "deterministic"
    metrics = _run(tmp_path, f"method.calibration={out}", "budget=0.2")
    assert metrics["n_questions"] == 2 and metrics["allocator"] == "error_aware"
    assert 0.19 < metrics["kept_fraction"] < 0.21


def test_uncalibrated_hf_model_names_the_command_then_runs_once_calibrated(tmp_path, monkeypatch):
    """A tiny random Llama saved as a local checkpoint (kvbench-tiny's tokenizer): model=hf refuses it with the
    calibration command, the script calibrates it (counting every test: it is untrained), then the run works."""
    monkeypatch.delenv("KVBENCH_CALIBRATION_DIR", raising=False)
    model = build_model("llama")
    model.resize_token_embeddings(733)
    ckpt = tmp_path / "tiny-llama"
    model.save_pretrained(ckpt)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ROOT / "kvbench" / "assets" / "kvbench-tiny" / f, ckpt / f)
    hf = ("model=hf", f"model.pretrained={ckpt}", "model.dtype=float32", "model.chat_template=false", "budget=0.3")
    with pytest.raises(UsageError, match="scripts/calibrate_compresskv.py"):
        _run(tmp_path, *hf)
    assert not list(tmp_path.rglob("predictions.jsonl")), "the failed configuration claimed no run directory"
    out = _script().main(["--model", "hf", "--pretrained", str(ckpt), "--dtype", "float32", "--count-all",
                          "--out", str(tmp_path / "cal" / "tiny-llama.json"), "--srh-lengths", "128",
                          "--srh-depths", "0.5", "--error-lengths", "128", "--error-samples", "1",
                          "--error-steps", "2"])
    assert json.loads(out.read_text())["model"]["n_layers"] == N_LAYERS
    monkeypatch.setenv("KVBENCH_CALIBRATION_DIR", str(out.parent))  # calibration=auto finds it by name
    metrics = _run(tmp_path, *hf)
    assert metrics["n_questions"] == 2 and 0.29 < metrics["kept_fraction"] < 0.31


def test_the_run_records_the_calibration_digest_and_refuses_to_resume_with_another(tmp_path):
    """The calibration path is in the config, its content is not: a run directory keeps the file's SHA-256 and a
    resumed run whose file changed under the same path is refused instead of mixing two calibrations."""
    import hashlib
    from pathlib import Path

    import yaml

    from kvbench.results import ConfigMismatchError

    cal = tmp_path / "cal.json"
    shutil.copy(CALIBRATION_DIR / "kvbench-tiny.json", cal)
    metrics = _run(tmp_path, f"method.calibration={cal}", "budget=0.2")
    run_dir = next(Path(p).parent for p in (tmp_path / "results").rglob("config.yaml"))
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["inputs"]
    assert recorded == {"calibration_sha256": hashlib.sha256(cal.read_bytes()).hexdigest()}
    (run_dir / "metrics.json").unlink()  # as if the job had been killed before finishing
    assert _run(tmp_path, f"method.calibration={cal}", "budget=0.2")["n_questions"] == metrics["n_questions"]
    (run_dir / "metrics.json").unlink()
    data = json.loads(cal.read_text())
    data["srh"]["ranking"] = [list(reversed(layer)) for layer in data["srh"]["ranking"]]  # a re-calibration
    cal.write_text(json.dumps(data))
    with pytest.raises(ConfigMismatchError, match="calibration_sha256: [0-9a-f]{64} then, [0-9a-f]{64} now"):
        _run(tmp_path, f"method.calibration={cal}", "budget=0.2")
    assert not (run_dir / "error.json").exists(), "the old run is not marked failed by the refused one"

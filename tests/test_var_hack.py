"""HACK and the baselines on the VAR runner with the embedded kvbench-tiny-var (written-down head roles)."""

from __future__ import annotations

import json

import pytest
import torch

from kvbench.errors import UsageError
from kvbench.var.allot import proportional
from kvbench.var.baselines import var_method
from kvbench.var.calibrate import calibrate
from kvbench.var.compress import select_top
from kvbench.var.generate import generate
from kvbench.var.hack import HackParams, HackScorer, labels_from
from kvbench.var.load import ASSETS, load_embedded
from methods.cake import CAKE
from methods.fullkv import FullKV
from methods.h2o import H2O
from methods.hack import HACK
from methods.snapkv import SnapKV
from methods.streamingllm import StreamingLLM

LABELS = torch.tensor([0, 3, 7])
ROLES = json.loads((ASSETS / "kvbench-tiny-var" / "config.json").read_text())["head_roles"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def model():
    return load_embedded("kvbench-tiny-var")


@pytest.fixture(scope="module")
def reference(model):
    return generate(*model, LABELS, seed=0)


def hack(model, **kw) -> HackScorer:
    var, _ = model
    return var_method(HACK(model="kvbench-tiny-var", **kw), var.cfg.depth, var.cfg.num_heads)


def test_calibration_labels_the_forced_heads(model) -> None:
    """Forced-vertical heads are contextual, forced (multi-)diagonal ones structural (fresh calibration)."""
    stat = calibrate(*model, classes=[1, 2], seeds=[11], min_step=2, sampling={"cfg": 1.5, "top_k": 900, "top_p": 0.96})
    labels = labels_from(stat, "gap")
    for b, roles in enumerate(ROLES):
        for h, role in enumerate(roles):
            if role == "vertical":
                assert labels[b, h], f"block {b} head {h} (vertical) should be contextual: {stat}"
            elif role in ("prev", "diag"):
                assert not labels[b, h], f"block {b} head {h} ({role}) should be structural: {stat}"
    assert int(labels.sum()) == 2, "the random heads are structural too (low variance)"
    assert torch.equal(labels_from(stat, 0.25), labels), "the top quarter = the two vertical heads"


def test_shipped_calibration_matches_the_roles(model) -> None:
    scorer = hack(model)
    expected = torch.tensor([[r == "vertical" for r in roles] for roles in ROLES])
    assert torch.equal(scorer.labels, expected)


class Recorder:
    """Wraps a VAR method; records (ctx, counts, kept indices) of every block and step."""

    def __init__(self, inner) -> None:
        self.inner, self.seen, self.compresses = inner, [], True

    def score(self, ctx):
        return self.inner.score(ctx)

    def counts(self, ctxs, keep):
        counts = self.inner.counts(ctxs, keep)
        for ctx, c in zip(ctxs, counts, strict=True):
            self.seen.append((ctx, c, keep, select_top(ctx, self.inner.score(ctx), c)))
        return counts


def test_per_head_budgets_average_exactly_the_budget_and_are_asymmetric(model) -> None:
    rec = Recorder(hack(model, budget_ratio=0.5))
    generate(*model, LABELS, seed=0, method=rec, budget=0.3, decode=False)
    labels = hack(model).labels
    compressed = 0
    for ctx, counts, keep, _ in rec.seen:
        per_stream = counts.view(ctx.n_streams, ctx.n_heads)
        caps = ctx.lens.view(ctx.n_streams, ctx.n_heads)
        if bool((caps.sum(1) >= ctx.n_heads * keep).all()):
            assert per_stream.sum(1).tolist() == [ctx.n_heads * keep] * ctx.n_streams, "average = budget, exactly"
        assert bool((per_stream <= caps).all())
        if bool((per_stream < caps).all()):
            compressed += 1
            ctx_heads, struct_heads = per_stream[:, labels[ctx.block_idx]], per_stream[:, ~labels[ctx.block_idx]]
            assert bool((ctx_heads.max(1).values <= struct_heads.min(1).values).all()), "contextual heads get less"
    assert compressed >= 4


def test_structural_heads_keep_the_whole_preceding_scale(model) -> None:
    """After step s (whose scale the next step's queries see as the preceding one), a structural row whose count
    covers pn_s^2 holds every token of scale s; the oldest scales go first."""
    rec = Recorder(hack(model))
    generate(*model, LABELS, seed=0, method=rec, budget=0.5, decode=False)
    labels, checked = hack(model).labels, 0
    for ctx, counts, _, kept in rec.seen:
        if kept is None:
            continue
        start, end = ctx.current
        scales = ctx.token_scale()
        for r in range(ctx.keys.shape[0]):
            if labels[ctx.block_idx, r % ctx.n_heads] or int(counts[r]) < end - start:
                continue
            pos = ctx.positions[r, kept[r]]
            assert set(range(start, end)) <= set(pos.tolist()), f"step {ctx.step} row {r}"
            kept_scales = scales[r, kept[r]]
            dropped = torch.ones(ctx.n, dtype=torch.bool)
            dropped[kept[r]] = False
            dropped &= ctx.valid[r]
            if bool(dropped.any()):
                assert int(scales[r, dropped].max()) <= int(kept_scales.min()), "older scales evicted first"
            checked += 1
    assert checked >= 10


def test_contextual_heads_keep_the_condition_token(model) -> None:
    rec = Recorder(hack(model))
    generate(*model, LABELS, seed=0, method=rec, budget=0.1, decode=False)
    labels = hack(model).labels
    for ctx, _, _, kept in rec.seen:
        if kept is not None:
            for r in range(ctx.keys.shape[0]):
                if labels[ctx.block_idx, r % ctx.n_heads]:
                    assert 0 in ctx.positions[r, kept[r]].tolist()


METHODS = {"fullkv": FullKV, "hack": lambda: HACK(model="kvbench-tiny-var"), "h2o": H2O, "snapkv": SnapKV,
           "streamingllm": StreamingLLM, "cake": lambda: CAKE(model="kvbench-tiny-var")}


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("budget", [1.0, 10_000])
def test_budget_covering_every_token_is_bit_identical_to_the_full_cache(model, reference, name, budget) -> None:
    var, vae = model
    out = generate(var, vae, LABELS, seed=0, method=var_method(METHODS[name](), 2, 4), budget=budget)
    assert all(torch.equal(a, b) for a, b in zip(out.tokens, reference.tokens, strict=True))
    assert torch.equal(out.image, reference.image)
    assert out.cache.nbytes() == reference.cache.nbytes()


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"fullkv"}))
def test_compression_changes_the_image_and_keeps_the_budget(model, reference, name) -> None:
    var, vae = model
    out = generate(var, vae, LABELS, seed=0, method=var_method(METHODS[name](), 2, 4), budget=0.3)
    assert not torch.equal(out.image, reference.image)
    rows = 2 * len(LABELS) * var.cfg.num_heads
    for rec, total in zip(out.cache.records, [1, 5, 14, 30, 66, 130], strict=True):
        keep = max(1, int(0.3 * total + 1e-9))
        assert rec.entries_after == var.cfg.depth * rows * keep, (name, rec)
    d = var.cfg.embed_dim // var.cfg.num_heads
    assert out.cache.nbytes() == out.cache.records[-1].entries_after * d * 4 * 2, "K and V of both CFG streams"
    assert out.cache.peak_bytes < reference.cache.peak_bytes


def test_proportional_counts_add_up_exactly() -> None:
    out = proportional(torch.tensor([0.5, 1.0, 1.0, 1.0]), torch.tensor([100, 100, 100, 100]), 70)
    assert int(out.sum()) == 70 and out.tolist() == [10, 20, 20, 20]
    out = proportional(torch.tensor([0.5, 1.0, 1.0, 1.0]), torch.tensor([100, 5, 100, 100]), 71)
    assert int(out.sum()) == 71 and int(out[1]) == 5 and abs(int(out[2]) - 2 * int(out[0])) <= 1
    assert proportional(torch.ones(3), torch.tensor([2, 2, 2]), 50).tolist() == [2, 2, 2]


def test_bad_inputs_are_one_clear_error(model, tmp_path) -> None:
    with pytest.raises(UsageError, match="calibrate_hack.py"):
        HackScorer.from_params(HackParams(model="no-such-model"), 2, 4)
    with pytest.raises(UsageError, match="budget_ratio"):
        HACK(budget_ratio=0.0)
    with pytest.raises(UsageError, match="split"):
        HACK(split=1.5)
    with pytest.raises(UsageError, match="blocks, heads"):
        HackScorer.from_params(HackParams(model="kvbench-tiny-var"), 3, 4)
    with pytest.raises(UsageError, match="VAR version"):
        from methods.pyramidkv import PyramidKV
        var_method(PyramidKV(), 2, 4)
    with pytest.raises(UsageError, match="visual autoregressive"):
        HACK().score(None)


def test_the_shipped_model_is_what_the_build_script_writes(tmp_path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_tiny_var", ASSETS.parents[1] / "scripts" / "build_tiny_var.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    var, vae = build.make()
    from kvbench.var.load import save_embedded

    save_embedded(var, vae, tmp_path, {"name": build.NAME, "head_roles": [list(r) for r in build.ROLES],
                                       "built_by": "scripts/build_tiny_var.py"})
    shipped = ASSETS / "kvbench-tiny-var"
    assert (tmp_path / "model.safetensors").read_bytes() == (shipped / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads((shipped / "config.json").read_text())
    assert (shipped / "model.safetensors").stat().st_size < 2_000_000


def test_calibration_script_writes_the_file_the_method_loads(tmp_path, monkeypatch, model) -> None:
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("calibrate_hack", ASSETS.parents[1] / "scripts" / "calibrate_hack.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "cal.json"
    monkeypatch.setattr(sys, "argv", ["calibrate_hack.py", "--classes", "1", "2", "--seeds", "5", "--out", str(out)])
    script.main()
    data = json.loads(out.read_text())
    assert data["method"] == "hack" and data["settings"]["seeds"] == [5] and len(data["weights_sha256"]) == 64
    scorer = HackScorer.from_params(HackParams(calibration=str(out)), 2, 4)
    assert torch.equal(scorer.labels, hack(model).labels), "the same two vertical heads"
    assert HACK(calibration=str(out)).inputs()["hack_calibration"] == __import__("hashlib").sha256(
        out.read_bytes()).hexdigest()

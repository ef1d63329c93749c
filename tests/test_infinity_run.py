"""HACK and the baselines on Infinity (kvbench-tiny-infinity) through the same cache / compression seam, and the
runner with ``task=infinity_prompts``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from kvbench.budget import tokens_per_head
from kvbench.errors import UsageError
from kvbench.var.baselines import var_method
from kvbench.var.calibrate import calibrate_bundle
from kvbench.var.hack import labels_from
from kvbench.var.infinity.generate import generate_infinity
from kvbench.var.infinity.load import load_embedded
from kvbench.var.load import ASSETS
from kvbench.var.run import run
from methods.cake import CAKE
from methods.h2o import H2O
from methods.hack import HACK
from methods.snapkv import SnapKV
from methods.streamingllm import StreamingLLM

ROOT = Path(__file__).resolve().parents[1]
NAME = "kvbench-tiny-infinity"
ROLES = json.loads((ASSETS / NAME / "config.json").read_text())["head_roles"]
PROMPTS = ["a red cube on a table", "a photo of a cat"]
METHODS = {"hack": lambda: HACK(model=NAME), "h2o": H2O, "snapkv": SnapKV, "streamingllm": StreamingLLM,
           "cake": CAKE}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_embedded(NAME)


@pytest.fixture(scope="module")
def reference(tiny):
    return generate_infinity(*tiny, PROMPTS, seed=0)


def scorer(name: str):
    return var_method(METHODS[name](), 2, 4)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("budget", [1.0, 10_000])
def test_a_budget_covering_every_token_is_bit_identical(tiny, reference, name, budget) -> None:
    out = generate_infinity(*tiny, PROMPTS, seed=0, method=scorer(name), budget=budget)
    assert torch.equal(out.image, reference.image) and out.cache.nbytes() == reference.cache.nbytes()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_compresses_to_exactly_the_budget(tiny, reference, name) -> None:
    out = generate_infinity(*tiny, PROMPTS, seed=0, method=scorer(name), budget=0.3)
    keep, rows = tokens_per_head(0.3, 121), 2 * len(PROMPTS) * 4
    per_block = [int(layer.lens.sum()) for layer in out.cache.layers]
    assert sum(per_block) == 2 * rows * keep, "per-row kept lengths average exactly the budget"
    if name != "cake":  # CAKE moves budget between blocks
        assert per_block == [rows * keep] * 2
    assert out.cache.condition_bytes == reference.cache.condition_bytes, "the text K/V are never compressed"
    assert out.cache.peak_bytes < reference.cache.peak_bytes and out.image.shape == reference.image.shape


def test_hack_gives_its_heads_asymmetric_budgets(tiny) -> None:
    out = generate_infinity(*tiny, PROMPTS, seed=0, method=scorer("hack"), budget=0.3)
    lens = out.cache.layers[0].lens.view(4, 4)  # (streams, heads); block 0 head 0 is the vertical one
    assert bool((lens[:, 0] < lens[:, 1]).all()), f"the contextual head gets budget_ratio x: {lens}"


def test_calibration_labels_the_written_heads(tiny) -> None:
    """The forced-vertical heads are contextual and the RoPE-diagonal ones structural (fresh calibration)."""
    from kvbench.var.bundle import InfinityBundle

    stat = calibrate_bundle(InfinityBundle(*tiny), ["a green apple", "a boat on a lake"], [11], 2,
                            {"cfg": 4.0, "tau": 0.5, "top_k": 900, "top_p": 0.97})
    labels = labels_from(stat, "gap")
    expected = torch.tensor([[r == "vertical" for r in roles] for roles in ROLES])
    assert torch.equal(labels, expected), stat
    shipped = json.loads((ASSETS / NAME / "hack_calibration.json").read_text())
    assert torch.equal(labels_from(torch.tensor(shipped["statistic"]), "gap"), expected)


def test_the_shipped_model_is_what_the_build_script_writes(tmp_path, monkeypatch) -> None:
    """The transformer and tokenizer weights are rebuilt bit for bit (the T5 weights come from transformers'
    initialiser and are stored, not compared: its init can change between transformers versions)."""
    import importlib.util
    import sys

    from safetensors.torch import load_file

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("build_tiny_infinity", ROOT / "scripts" / "build_tiny_infinity.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    monkeypatch.setattr(sys, "argv", ["build_tiny_infinity.py", "--out", str(tmp_path)])
    build.main()
    new, shipped = load_file(str(tmp_path / "model.safetensors")), load_file(str(ASSETS / NAME / "model.safetensors"))
    assert new.keys() == shipped.keys()
    assert all(torch.equal(new[k], shipped[k]) for k in new if not k.startswith("t5."))
    assert (ASSETS / NAME / "model.safetensors").stat().st_size < 2_000_000


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"model={NAME}", "task=infinity_prompts", *overrides])


SMALL = ("task.seeds=[0]", "task.prompts=[a red cube,a photo of a cat]", "threads=1")


def test_hack_run_on_infinity(tmp_path) -> None:
    metrics = run(composed("method=hack", "budget=0.3", f"paths.results={tmp_path}", *SMALL))
    out = tmp_path / "infinity_prompts" / NAME / "hack" / "budget=0.3" / "seed=0"
    assert (out / "metrics.json").exists() and len(list((out / "images").glob("seed0_prompt*.png"))) == 2
    assert metrics["run"]["arch"] == "infinity" and metrics["inputs"]["hack_calibration"]
    assert 0 < metrics["score"]["token_agreement"] < 1 and metrics["token_agreement_by_scale"][:2] == [1.0, 1.0]
    assert metrics["score"]["token_agreement"] < metrics["bit_agreement"] < 1, "a token differs when one bit does"
    assert metrics["condition_kv_bytes"] > 0 and metrics["peak_kv_bytes"] < metrics["full_peak_kv_bytes"]
    assert len(metrics["attention_ms_by_scale"]) == 5


@pytest.mark.parametrize(("model", "task", "message"), [
    (NAME, "var_class", "has no prompts"),
    ("kvbench-tiny-var", "infinity_prompts", "has no classes"),
    ("infinity-2b", "infinity_prompts", "not found"),
])
def test_mismatched_models_and_tasks_are_one_clear_error(tmp_path, model, task, message) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", f"task={task}", "method=fullkv",
                                           f"paths.results={tmp_path}"])
    with pytest.raises(UsageError, match=message):
        run(cfg)
    assert not list(tmp_path.rglob("*")), "nothing written before the inputs are checked"


def test_clip_score_is_100_times_the_clipped_cosine(tiny_clip, tiny) -> None:
    """Against the embeddings computed through the CLIP towers and projections by hand."""
    from kvbench.var.metrics import clip_score, load_clip

    clip = load_clip(str(tiny_clip))
    images = generate_infinity(*tiny, PROMPTS, seed=0).image
    model, proc = clip
    inputs = proc(text=PROMPTS, images=list(images.mul(255).round().byte().permute(0, 2, 3, 1).numpy()),
                  return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=inputs["input_ids"],
                                                     attention_mask=inputs["attention_mask"]).pooler_output)
    cos = torch.nn.functional.cosine_similarity(img, txt)
    assert torch.allclose(torch.tensor(clip_score(images, PROMPTS, clip)), 100 * cos.clamp_min(0), atol=1e-4)


def test_clip_score_in_a_run_and_its_errors(tmp_path, tiny_clip) -> None:
    metrics = run(composed("method=snapkv", "budget=0.3", f"paths.results={tmp_path}", *SMALL,
                           "task.metrics=[token_agreement,psnr,ssim,clip_score]", f"task.clip_model={tiny_clip}"))
    assert 0 <= metrics["clip_score"] <= 100 and 0 <= metrics["full_clip_score"] <= 100
    assert len(metrics["batches"][0]["clip_score"]) == 2
    with pytest.raises(UsageError, match="could not be loaded"):
        run(composed("method=snapkv", f"paths.results={tmp_path / 'b'}", *SMALL, "task.metrics=[clip_score]",
                     f"task.clip_model={tmp_path / 'no-clip'}"))
    with pytest.raises(UsageError, match="needs text prompts and task.clip_model"):
        run(composed("method=snapkv", f"paths.results={tmp_path / 'c'}", *SMALL, "task.metrics=[clip_score]"))
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()

"""kvbench-tiny-vl: the written-down Qwen2-VL loads like a checkpoint, is rebuilt identically, reads its synthetic
tasks with plain transformers ``generate()`` (full cache), and loses them when the screenshots are evicted."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kvbench.models import resolve_source
from kvbench.tasks import synth_gui, synth_video
from kvbench.tasks.vision import generate_answer, load_vl, patchify_video, qwen_vl_inputs

ROOT = Path(__file__).resolve().parents[1]
ASSET = Path(resolve_source("embedded:kvbench-tiny-vl"))


def build_script():  # noqa: ANN201 - the module scripts/build_tiny_vl.py
    spec = importlib.util.spec_from_file_location("build_tiny_vl", ROOT / "scripts" / "build_tiny_vl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vl():  # noqa: ANN201
    return load_vl(ASSET)


def answer(vl, sample, q) -> str:  # noqa: ANN001
    return generate_answer(*vl, sample, q, max_new_tokens=3).split(".")[0].strip()


def accuracy(vl, samples) -> float:  # noqa: ANN001
    results = [answer(vl, s, q) == q.answers[0] for s in samples for q in s.questions]
    return 100 * sum(results) / len(results)


def test_asset_is_small_and_rebuilt_identically(vl) -> None:  # noqa: ANN001
    assert (ASSET / "model.safetensors").stat().st_size < 3 * 2**20
    model, _ = vl
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    rebuilt = build_script().build_model(seed=0).state_dict()
    loaded = model.state_dict()
    assert set(rebuilt) == set(loaded) and all(torch.equal(rebuilt[k], loaded[k]) for k in rebuilt)


def test_inputs_match_the_transformers_processor(vl) -> None:  # noqa: ANN001
    import transformers as tf

    class ImageOnly(tf.Qwen2VLProcessor):  # transformers 5 type-checks the video processor (needs torchvision)
        def check_argument_for_proper_class(self, name, arg):  # noqa: ANN001, ANN202
            return None if name == "video_processor" and arg is None else super().check_argument_for_proper_class(
                name, arg)

    _, (tok, ip) = vl
    proc = ImageOnly(image_processor=ip, tokenizer=tok, video_processor=None)
    sample = synth_gui.make_samples(n_samples=1, n_screens=2)[0]
    text = sample.context + sample.questions[0].text
    ours = qwen_vl_inputs(text, sample.images, [], tok, ip)
    ref = proc(text=[text.replace("<|kvbench_image|>", "<|vision_start|><|image_pad|><|vision_end|>")],
               images=sample.images, return_tensors="pt")
    for key in ("input_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids"):
        assert torch.equal(ours[key], ref[key]), key


def test_video_layout_of_still_frames_is_the_image_layout(vl) -> None:  # noqa: ANN001
    _, (_, ip) = vl
    img = synth_gui.make_samples(n_samples=1, n_screens=2)[0].images[0]
    pixels, thw = patchify_video([img, img])
    ref = ip(images=[img], return_tensors="pt")  # the image processor repeats a still image over the 2 frames
    assert torch.equal(thw, ref["image_grid_thw"]) and torch.allclose(pixels, ref["pixel_values"])


def test_full_cache_generate_answers_both_tasks(vl) -> None:  # noqa: ANN001
    assert accuracy(vl, synth_gui.make_samples(n_samples=3)) >= 90
    assert accuracy(vl, synth_video.make_samples(n_samples=3)) >= 90


def keep_sinks_and_recent(model, fraction: float):  # noqa: ANN001, ANN201
    """Forward hooks that cut every layer's cache to 4 sinks + the most recent tokens after the prefill
    (StreamingLLM's prefill eviction); ``generate()`` keeps the positions (transformers' own M-RoPE bookkeeping)."""
    def hook(module, args, kwargs, output):  # noqa: ANN001, ANN202
        if kwargs["hidden_states"].shape[1] > 1:
            layer = kwargs["cache"].layers[module.layer_idx]
            n = layer.keys.shape[2]
            keep = torch.cat([torch.arange(4), torch.arange(n - max(1, int(fraction * n) - 4), n)])
            layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
        return output

    return [m.register_forward_hook(hook, with_kwargs=True) for name, m in model.named_modules()
            if name.endswith("self_attn") and "language_model" in name]


def test_evicting_the_screenshots_breaks_the_answers(vl) -> None:  # noqa: ANN001
    samples = synth_gui.make_samples(n_samples=3)
    hooks = keep_sinks_and_recent(vl[0], 0.1)
    try:
        evicted = accuracy(vl, samples)
    finally:
        for h in hooks:
            h.remove()
    assert evicted <= accuracy(vl, samples) - 30


@pytest.mark.slow
def test_full_cache_accuracy_on_the_default_tasks(vl) -> None:  # noqa: ANN001
    assert accuracy(vl, synth_gui.make_samples()) >= 90
    assert accuracy(vl, synth_video.make_samples()) >= 90

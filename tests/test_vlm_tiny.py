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


def image_spans(ids: torch.Tensor, image_id: int) -> list[tuple[int, int]]:
    """``[start, end)`` of every run of image tokens."""
    idx = (ids == image_id).nonzero().flatten().tolist()
    starts = [i for k, i in enumerate(idx) if k == 0 or idx[k - 1] != i - 1]
    ends = [i + 1 for k, i in enumerate(idx) if k == len(idx) - 1 or idx[k + 1] != i + 1]
    return list(zip(starts, ends, strict=True))


def guikv_keep(attn: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor, images: list, n: int, budget: float
               ) -> torch.Tensor:
    """GUI-KV's selection from one layer's prefill tensors (window 8, avg-pool 5, saliency, QR redundancy), one
    token set per KV head by the max over its query heads (the GQA-aware variant): [H_kv, cap] kept indices."""
    from methods import guikv

    cap = int(budget * n)
    w = min(guikv.WINDOW, cap - 2)
    scores = torch.nn.functional.avg_pool1d(attn[:, -w:, : n - w].sum(1)[None], 5, 1, 2)[0]  # [H_q, n - w]
    group = attn.shape[0] // keys.shape[0]
    s = guikv.guikv_scores(scores, hidden, keys.repeat_interleave(group, 0), images, cap / n)
    top = guikv.group_scores(s, keys.shape[0]).topk(cap - w, dim=-1).indices.sort(-1).values
    return torch.cat([top, torch.arange(n - w, n).expand(keys.shape[0], w)], dim=-1)


def evicted_answer(vl, sample, q, budget: float) -> str:  # noqa: ANN001
    """Prefill with the full cache (eager attention, as the prefill itself uses full K/V), evict every layer with
    GUI-KV's kernels, then decode with explicit 3-D positions ``prompt_len + step + rope_deltas``."""
    from transformers import DynamicCache

    model, (tok, ip) = vl
    inputs = qwen_vl_inputs(sample.context + q.text, sample.images, sample.frames, tok, ip)
    ids = inputs["input_ids"][0]
    n, images, cache = ids.numel(), image_spans(ids, model.config.image_token_id), DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(**inputs, cache=cache, use_cache=True, output_attentions=True, output_hidden_states=True)
        for layer, kv in enumerate(cache.layers):
            hidden = model.model.language_model.layers[layer].input_layernorm(out.hidden_states[layer][0])
            keep = guikv_keep(out.attentions[layer][0].float(), kv.keys[0], hidden, images, n, budget)
            index = keep[None, :, :, None].expand(1, -1, -1, kv.keys.shape[-1])
            kv.keys, kv.values = kv.keys.gather(2, index), kv.values.gather(2, index)
        tokens = [int(out.logits[0, -1].argmax())]
        for step in range(2):
            pos = (torch.tensor([[n + step]]) + model.model.rope_deltas).view(1, 1, 1).expand(3, 1, 1)
            logits = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, position_ids=pos).logits
            tokens.append(int(logits[0, -1].argmax()))
    return tok.decode(tokens).split(".")[0].strip()


@pytest.mark.slow
def test_guikv_kernels_keep_what_the_default_needs(vl) -> None:  # noqa: ANN001
    """At budget 0.1 GUI-KV's selection (these kernels on the model's own tensors) keeps the answers that
    StreamingLLM's loses (a reference harness outside the engine: full-cache prefill, then eviction)."""
    vl[0].set_attn_implementation("eager")
    try:
        samples = synth_gui.make_samples(n_samples=3)
        got = [evicted_answer(vl, s, q, 0.1) == q.answers[0] for s in samples for q in s.questions]
    finally:
        vl[0].set_attn_implementation("sdpa")
    assert sum(got) / len(got) >= 0.9

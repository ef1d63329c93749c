"""Vision-language adapters against transformers: tiny random Qwen2-VL, Qwen2.5-VL and LLaVA-style models built
from configs (no downloads). After eviction, decode logits (and a question appended over the compressed context)
equal the full model run by transformers with exactly the evicted entries masked, at positions transformers
computes itself (M-RoPE ``get_rope_index`` over the whole sequence); with the full cache the engine's greedy tokens
equal ``generate()``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image
from torch import Tensor

from kvbench.budget import Uniform
from kvbench.engine import Engine, LayerContext
from kvbench.engine.adapters import LlavaAdapter, Qwen2VLAdapter, UnsupportedModelError, adapter_for
from kvbench.engine.vl import Prompt, VisionInputs, frame_spans, image_spans, token_runs
from kvbench.errors import UsageError
from kvbench.method import Method
from kvbench.tasks.vision import patchify_video, token_types_required
from methods.fullkv import FullKV

VOCAB, START, END, IMAGE, VIDEO = 128, 3, 4, 5, 6
TEXT = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096, "pad_token_id": 0}
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
V5 = int(tf.__version__.split(".")[0]) >= 5  # transformers 4.57 (make test-compat): no *Pil classes, rope_scaling
QWEN_IP = tf.Qwen2VLImageProcessorPil if V5 else tf.Qwen2VLImageProcessor  # 4.x: the PIL one has no suffix
CLIP_IP = tf.CLIPImageProcessorPil if V5 else tf.CLIPImageProcessor


def mrope(theta: float, section: list[int]) -> dict:
    """M-RoPE config fields in the installed transformers' spelling."""
    if V5:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta, "mrope_section": section}}
    return {"rope_theta": theta, "rope_scaling": {"type": "mrope", "mrope_section": section}}


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def qwen_model(kind: str) -> tf.PreTrainedModel:
    torch.manual_seed(0)
    rope = mrope(10000.0, [2, 3, 3])
    ids = {"image_token_id": IMAGE, "video_token_id": VIDEO, "vision_start_token_id": START,
           "vision_end_token_id": END}
    if kind == "qwen2_vl":
        cfg = tf.Qwen2VLConfig(text_config={**TEXT, **rope},
                               vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2,
                                              "mlp_ratio": 2}, **ids)
        return tf.Qwen2VLForConditionalGeneration(cfg).eval()
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
              "window_size": 112, "fullatt_block_indexes": [1], "tokens_per_second": 2}  # a dict: 4.57 spells no class
    cfg = tf.Qwen2_5_VLConfig(text_config={**TEXT, **rope},
                              vision_config=vision, **ids)
    return tf.Qwen2_5_VLForConditionalGeneration(cfg).eval()


def text(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(10, VOCAB, n).tolist()


def qwen_prompt(kind: str, video: bool) -> Prompt:
    """Text, two images (of different sizes), optionally a 4-frame video, text; the pixel inputs as the PIL image
    processor and the video layout of :func:`kvbench.tasks.vision.patchify_video` give them."""
    rng = np.random.default_rng(1)
    ip = QWEN_IP(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, patch_size=14,
                                     merge_size=2, temporal_patch_size=2, image_mean=MEAN, image_std=STD)
    enc = ip(images=[picture((112, 56), 0), picture((56, 84), 1)], return_tensors="pt")
    tensors = {"pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}
    ids = text(rng, 9)
    for thw in enc["image_grid_thw"]:
        ids += [START] + [IMAGE] * (int(thw.prod()) // 4) + [END] + text(rng, 5)
    if video:
        pv, thw = patchify_video([picture((56, 56), 10 + i) for i in range(4)], mean=MEAN, std=STD)
        tensors.update(pixel_values_videos=pv, video_grid_thw=thw)
        if kind == "qwen2_5_vl":
            tensors["second_per_grid_ts"] = torch.tensor([1.0])
        ids += [START] + [VIDEO] * (int(thw.prod()) // 4) + [END]
    ids += text(rng, 30)
    t = torch.tensor(ids)
    if token_types_required():
        tensors["mm_token_type_ids"] = ((t == IMAGE).long() + 2 * (t == VIDEO).long())[None]
    return Prompt(ids, VisionInputs(tensors), image_spans(t, IMAGE))


def llava_model() -> tf.PreTrainedModel:
    torch.manual_seed(0)
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=224, patch_size=32, projection_dim=32)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**TEXT), image_token_index=IMAGE,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=49)
    return tf.LlavaForConditionalGeneration(cfg).eval()


def llava_prompt() -> Prompt:
    """Two 224 x 224 images of 49 tokens each (CLIP patch 32, CLS dropped), as LlavaProcessor lays them out."""
    rng = np.random.default_rng(1)
    ip = CLIP_IP(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    enc = ip(images=[picture((224, 224), 0), picture((300, 224), 1)], return_tensors="pt")
    ids = text(rng, 7) + [IMAGE] * 49 + text(rng, 4) + [IMAGE] * 49 + text(rng, 30)
    return Prompt(ids, VisionInputs({"pixel_values": enc["pixel_values"]}), image_spans(torch.tensor(ids), IMAGE))


@dataclass
class EvictPattern(Method):
    """Scores that depend on the cache slot only (the same for every head and layer), so the engine evicts exactly
    the same entries everywhere and one 4-D mask describes the evicted cache; it also records the spans and that
    the layer's input hidden states reached it."""

    name: str = "evict_pattern"
    window: int = 8

    def score(self, ctx: LayerContext) -> Tensor:
        self.seen = (dict(ctx.spans), None if ctx.hidden_states is None else tuple(ctx.hidden_states.shape))
        g = torch.Generator().manual_seed(7)
        return torch.rand(ctx.n - ctx.window, generator=g).expand(ctx.n_kv_heads, -1)  # (H_kv, n - w)


def kept_slots(eng: Engine, n: int) -> Tensor:
    """The cache slots < n that every head of every layer kept (asserted identical everywhere)."""
    slots = [layer.head(h)[2] for layer in eng.store.layers for h in range(layer.n_heads)]
    assert all(torch.equal(s, slots[0]) for s in slots)
    return slots[0][slots[0] < n]


def reference_logits(model: tf.PreTrainedModel, prompt: Prompt, extra: list[int], kept: Tensor | None) -> Tensor:
    """transformers' own forward over prompt + extra tokens (its own positions); rows of the extra tokens see only
    the ``kept`` prompt slots (all of them when None). The logits of the extra rows and the prompt's last: (k+1, V)."""
    ids = torch.tensor(list(prompt) + extra)[None]
    n, total = len(prompt), ids.shape[1]
    tensors = dict(prompt.vision.tensors)
    mask = torch.ones(total, total, dtype=torch.bool).tril()
    if kept is not None:
        visible = torch.zeros(n, dtype=torch.bool)
        visible[kept] = True
        mask[n:, :n] &= visible
    kwargs: dict = {}
    adapter = adapter_for(model)
    if isinstance(adapter, Qwen2VLAdapter):
        tensors.pop("mm_token_type_ids", None)
        image_id, video_id = adapter.vision_ids
        types = ((ids == image_id).long() + 2 * (ids == video_id).long())  # the processor's types, here by hand
        full_types = {"mm_token_type_ids": types} if token_types_required() else {}
        rope = {k: v for k, v in tensors.items() if k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
        kwargs["position_ids"], _ = model.model.get_rope_index(ids, **full_types, **rope)
        tensors.update(full_types)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask[None, None], **kwargs, **tensors).logits[0]
    return out[n - 1:]


def engine_logits(model: tf.PreTrainedModel, method: Method, budget: float, prompt: Prompt, question: list[int],
                  decode: list[int]) -> tuple[Tensor, Engine]:
    """Compressed prefill of the prompt (with its pixel inputs), the question appended uncompressed, then decode
    tokens one at a time; the logits of the prompt's last token and of every appended token."""
    with Engine(model, method, Uniform(), budget=budget) as eng:
        eng.reset()
        eng.spans, eng.vision = dict(prompt.spans), prompt.vision
        first = eng.forward(list(prompt), compress=True)
        snap = eng.snapshot()
        rows = []
        for _ in range(2):  # the second pass after a rollback must give the same logits
            eng.rollback(snap)
            step = [eng.forward(question)] if question else []
            step += [eng.forward([t]) for t in decode]
            rows.append(step)
        torch.testing.assert_close(torch.stack(rows[0]), torch.stack(rows[1]), atol=0, rtol=0)
    return torch.stack([first, *rows[0]]), eng


MODELS = {"qwen2_vl": lambda: (qwen_model("qwen2_vl"), qwen_prompt("qwen2_vl", video=True)),
          "qwen2_5_vl": lambda: (qwen_model("qwen2_5_vl"), qwen_prompt("qwen2_5_vl", video=True)),
          "llava": lambda: (llava_model(), llava_prompt())}


@pytest.mark.parametrize("kind", list(MODELS))
def test_decode_after_eviction_equals_the_full_model_with_the_evicted_entries_masked(kind: str) -> None:
    model, prompt = MODELS[kind]()
    n = len(prompt)
    question, decode = text(np.random.default_rng(5), 6), text(np.random.default_rng(6), 5)
    method = EvictPattern()
    got, eng = engine_logits(model, method, 0.4, prompt, [], decode)
    kept = kept_slots(eng, n)
    assert 0.3 * n < len(kept) < 0.5 * n  # really evicted, image tokens included
    ref = reference_logits(model, prompt, decode, kept)
    torch.testing.assert_close(got[0], ref[0], atol=2e-5, rtol=0)  # the prompt's last token saw everything
    torch.testing.assert_close(got[1:], ref[1:], atol=2e-5, rtol=0)
    full = reference_logits(model, prompt, decode, None)
    assert (got[1:] - full[1:]).abs().max() > 1e-3  # the eviction changed the logits (the test can fail)
    # a question appended over the compressed context (query-agnostic), rolled back and asked again
    got_q, eng = engine_logits(model, EvictPattern(), 0.4, prompt, question, decode)
    ref_q = reference_logits(model, prompt, question + decode, kept_slots(eng, n))
    torch.testing.assert_close(got_q[1:], ref_q[len(question):], atol=2e-5, rtol=0)
    assert method.seen[1] == (n, 64)  # the attention input reached the method
    assert {k for k in method.seen[0] if k.startswith("image:")} == {"image:0", "image:1"}


@pytest.mark.parametrize("kind", list(MODELS))
def test_budget_one_equals_transformers_generate(kind: str) -> None:
    model, prompt = MODELS[kind]()
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor([list(prompt)]), max_new_tokens=8, min_new_tokens=8,
                             do_sample=False, **prompt.vision.tensors)[0, len(prompt):].tolist()
    with Engine(model, FullKV(), Uniform(), budget=1.0) as eng:
        eng.reset()
        eng.vision = prompt.vision
        tokens, _ = eng.generate(eng.forward(list(prompt), compress=True), max_new_tokens=8)
    assert tokens == ref


def test_mrope_positions_continue_from_rope_deltas_not_the_cache() -> None:
    model, prompt = MODELS["qwen2_vl"]()
    adapter = adapter_for(model)
    ids = torch.tensor(list(prompt))
    pos = adapter.positions(ids, 0, prompt.vision)
    assert pos.shape == (3, 1, len(prompt)) and adapter.rope_delta < 0  # images take fewer positions than tokens
    assert adapter.rope_delta == int(pos.max()) + 1 - len(prompt)
    nxt = adapter.positions(torch.tensor([1, 2]), len(prompt) + 3, None)  # 3 tokens later, whatever was evicted
    assert nxt.shape == (3, 1, 2) and (nxt == torch.tensor([3, 4]) + len(prompt) + adapter.rope_delta).all()
    fresh = adapter.positions(torch.tensor([1, 2]), 0, None)  # a text prompt on a fresh cache: no delta
    assert fresh[:, 0].tolist() == [[0, 1]] * 3


def test_spans_name_every_image_and_frame_in_order() -> None:
    ids = torch.tensor([9, IMAGE, IMAGE, 9, IMAGE, 9] + [VIDEO] * 6 + [9])
    assert token_runs(ids, IMAGE) == [(1, 3), (4, 5)]
    assert image_spans(ids, IMAGE, offset=10) == {"image:0": (11, 13), "image:1": (14, 15)}
    assert frame_spans(ids, VIDEO, [2]) == {"frame:0": (6, 8), "frame:1": (8, 10), "frame:2": (10, 12)}
    with pytest.raises(UsageError, match="2 videos"):
        frame_spans(ids, VIDEO, [2, 2])


def test_vision_tokens_without_pixels_are_refused_and_families_are_matched() -> None:
    model, prompt = MODELS["llava"]()
    assert isinstance(adapter_for(model), LlavaAdapter)
    assert adapter_for(model).attn_config() is model.config.text_config  # the vision tower keeps its attention
    with Engine(model, FullKV(), Uniform(), budget=1.0) as eng, pytest.raises(UsageError, match="dropped silently"):
        eng.reset()
        eng.forward(list(prompt))  # image tokens, no pixel inputs
    qwen, _ = MODELS["qwen2_vl"]()
    assert isinstance(adapter_for(qwen), Qwen2VLAdapter)


def test_a_multimodal_model_without_an_adapter_is_refused() -> None:
    torch.manual_seed(0)
    cfg = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                           num_attention_heads=2, image_size=64, patch_size=32),
                         text_config=tf.LlamaConfig(**TEXT), image_token_index=IMAGE)
    model = tf.LlavaForConditionalGeneration(cfg).eval()
    model.config.model_type = "fancy_vlm"  # a wrapper type no adapter declares
    with pytest.raises(UnsupportedModelError, match="fancy_vlm"):
        adapter_for(model)

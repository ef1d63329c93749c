"""Every vision-language model config of ``conf/model`` at tiny size: its architecture (the fields copied from the
checkpoint's config.json, sizes shrunk) built with random weights, prompts built by kvbench's own encoder with the
family's real (PIL) image processor / transformers processor, and decode after eviction equal to transformers with
exactly the evicted entries masked."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
import yaml
from omegaconf import OmegaConf
from test_adapters_vl import EvictPattern, engine_logits, kept_slots, picture, reference_logits, text
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from kvbench.engine.adapters import adapter_for
from kvbench.multimodal import VisionEncoder
from kvbench.tasks.base import IMAGE, VIDEO

ROOT = Path(__file__).resolve().parents[1]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
LLAVA_SPECIALS = ["<|endoftext|>", "<image>", "<video>"]
TEXT = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}
QWEN_IMAGE = {"size": {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}, "patch_size": 14, "merge_size": 2,
              "temporal_patch_size": 2}


def char_tokenizer(specials: list[str], named: dict[str, str]) -> tf.PreTrainedTokenizerFast:
    """A character-level tokenizer with the family's special tokens (ids 97 + i)."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tk = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(["<unk>", *chars])}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(specials)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<|endoftext|>",
                                      extra_special_tokens=named)


def qwen25(tok: tf.PreTrainedTokenizerFast, act: str = "silu") -> tf.PreTrainedModel:
    """Qwen2.5-VL-7B's architecture (UI-TARS-1.5-7B is the same): M-RoPE sections 16/24/24 of head_dim 128 (here
    2/3/3 of 16), rope_theta 1e6, a windowed vision tower (window 112, full attention in every 4th block), SiLU."""
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"), ("video_token_id",
           "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
    vision = tf.Qwen2_5_VLVisionConfig(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                       window_size=112, fullatt_block_indexes=[3], tokens_per_second=2, hidden_act=act,
                                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    text_cfg = tf.Qwen2_5_VLTextConfig(**TEXT, rope_parameters=rope, use_sliding_window=False, sliding_window=32768,
                                       max_window_layers=2)
    cfg = tf.Qwen2_5_VLConfig(text_config=text_cfg, vision_config=vision, **ids)
    return tf.Qwen2_5_VLForConditionalGeneration(cfg).eval()


def llava15(tok: tf.PreTrainedTokenizerFast) -> tuple[tf.PreTrainedModel, object]:
    """LLaVA-1.5-7B: CLIP ViT (patch 14; 336 px there, 56 here), the second-to-last layer's features without CLS,
    a GELU MLP projector, a Llama language model."""
    vis = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=32)
    cfg = tf.LlavaConfig(vision_config=vis, text_config=tf.LlamaConfig(**TEXT), image_token_index=97 + 1,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu", image_seq_length=16)
    ip = tf.CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    proc = tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                             num_additional_image_tokens=1)
    return tf.LlavaForConditionalGeneration(cfg).eval(), proc


def llava_next(tok: tf.PreTrainedTokenizerFast) -> tuple[tf.PreTrainedModel, object]:
    """LLaVA-NeXT (v1.6-vicuna-7b): CLIP ViT patch 14 with anyres tiles (pinpoints 336x672 ... there, scaled to 56
    here), default selection from layer -2, image newline tokens, a Llama language model."""
    pins = [[56, 112], [112, 56], [112, 112]]
    vis = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=32)
    cfg = tf.LlavaNextConfig(vision_config=vis, text_config=tf.LlamaConfig(**TEXT), image_token_index=97 + 1,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             image_grid_pinpoints=pins)
    ip = tf.LlavaNextImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                       image_grid_pinpoints=pins)
    proc = tf.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return tf.LlavaNextForConditionalGeneration(cfg).eval(), proc


def llava_onevision(tok: tf.PreTrainedTokenizerFast) -> tuple[tf.PreTrainedModel, object]:
    """LLaVA-OneVision-Qwen2-7B: SigLIP (patch 14), all features of the last layer, anyres_max_9 tiles, a Qwen2
    language model."""
    pins = [[56, 56], [56, 112], [112, 56], [112, 112]]
    vis = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14)
    cfg = tf.LlavaOnevisionConfig(vision_config=vis, text_config=tf.Qwen2Config(**TEXT), image_token_index=97 + 1,
                                  video_token_index=97 + 2, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=pins,
                                  vision_aspect_ratio="anyres_max_9")
    ip = tf.LlavaOnevisionImageProcessorPil(size={"height": 56, "width": 56}, image_grid_pinpoints=pins,
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3)

    class ImageOnly(tf.LlavaOnevisionProcessor):  # transformers 5 type-checks the video processor (torchvision)
        def check_argument_for_proper_class(self, name, arg):  # noqa: ANN001, ANN202
            return None if name == "video_processor" and arg is None else super().check_argument_for_proper_class(
                name, arg)

    proc = ImageOnly(image_processor=ip, tokenizer=tok, video_processor=None, num_image_tokens=16,
                     vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    return tf.LlavaOnevisionForConditionalGeneration(cfg).eval(), proc


def build(name: str) -> tuple[tf.PreTrainedModel, VisionEncoder, tf.PreTrainedTokenizerFast]:
    torch.manual_seed(0)
    if name in ("qwen2.5-vl-7b-instruct", "ui-tars-1.5-7b"):
        tok = char_tokenizer(QWEN_SPECIALS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
        model = qwen25(tok)
        ip = tf.Qwen2VLImageProcessorPil(**QWEN_IMAGE)
        return model, VisionEncoder("qwen2_vl", "qwen2_5_vl", ip, *adapter_for(model).vision_ids,
                                    video_pixels=(56 * 56, 112 * 112)), tok
    tok = char_tokenizer(LLAVA_SPECIALS, {"image_token": "<image>", "video_token": "<video>"})
    model, proc = {"llava-1.5-7b": llava15, "llava-next-vicuna-7b": llava_next,
                   "llava-onevision-qwen2-7b": llava_onevision}[name](tok)
    return model, VisionEncoder("llava", model.config.model_type, proc.image_processor, *adapter_for(model).vision_ids,
                                proc), tok


FAMILY = {"qwen2_5_vl": "qwen2_vl", "llava": "llava", "llava_next": "llava", "llava_onevision": "llava"}
TINY = ("qwen2.5-vl-7b-instruct", "ui-tars-1.5-7b", "llava-1.5-7b", "llava-next-vicuna-7b", "llava-onevision-qwen2-7b")


def vl_configs() -> dict[str, dict]:
    out = {}
    for path in sorted((ROOT / "conf" / "model").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        if cfg.get("family") == "vl":
            out[path.stem] = cfg
    return out


def test_every_vl_config_is_pinned_or_says_why_not() -> None:
    configs = vl_configs()
    assert set(TINY) | {"kvbench-tiny-vl", "opencua-7b"} == set(configs)
    for name, cfg in configs.items():
        raw = (ROOT / "conf" / "model" / f"{name}.yaml").read_text()
        assert cfg["revision"] is None and ("could be found" in raw or cfg["pretrained"].startswith("embedded:")) \
            or re.fullmatch(r"[0-9a-f]{40}", cfg["revision"]), name


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_of_each_config_decodes_after_eviction_like_the_masked_full_model(name: str) -> None:
    model, encoder, tok = build(name)
    assert adapter_for(model).family == FAMILY[model.config.model_type]
    images = [picture((112, 56), 0), picture((56, 84), 1)]
    rng = np.random.default_rng(3)
    context = f"look {IMAGE} and then {IMAGE} now: " + "".join(chr(c) for c in rng.integers(97, 123, 40))
    prompt = encoder.encode(tok, context, images, [])
    assert {k for k in prompt.spans} == {"image:0", "image:1"}
    s0, s1 = prompt.spans["image:0"], prompt.spans["image:1"]
    assert 0 < s0[0] < s0[1] < s1[0] < s1[1] < len(prompt)
    decode = text(np.random.default_rng(4), 4)
    got, eng = engine_logits(model, EvictPattern(), 0.4, prompt, [], decode)
    ref = reference_logits(model, prompt, decode, kept_slots(eng, len(prompt)))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


QWEN_TEMPLATE = (  # a minimal Qwen-style template written for this test
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_prompt_with_screenshot_turns_equals_the_transformers_processor() -> None:
    from kvbench.pipeline import RunOptions, question_ids, question_prompt
    from kvbench.tasks.base import Question, Sample

    model, encoder, tok = build("ui-tars-1.5-7b")
    tok.chat_template = QWEN_TEMPLATE
    images = [picture((112, 56), 0), picture((56, 84), 1)]
    messages = [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "# Step 1: ok"},
                {"role": "user", "content": [{"type": "image"}]}]
    sample = Sample("s", "", [Question("0", "click the button", ["x"])], images=images, messages=messages)
    opts = RunOptions(protocol="query_aware", max_new_tokens=4, stop=[], metrics=[], chat=True, vision=encoder)
    ids, spans, extra = question_prompt(tok, sample, sample.questions[0], opts)

    class ImageOnly(tf.Qwen2_5_VLProcessor):  # transformers 5 type-checks the video processor (torchvision)
        def check_argument_for_proper_class(self, name, arg):  # noqa: ANN001, ANN202
            return None if name == "video_processor" and arg is None else super().check_argument_for_proper_class(
                name, arg)

    proc = ImageOnly(image_processor=encoder.image_processor, tokenizer=tok, video_processor=None,
                     chat_template=QWEN_TEMPLATE)
    last = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "click the button"}]}
    full = [*messages[:2], last]
    text = proc.apply_chat_template(full, add_generation_prompt=True, tokenize=False)
    ref = proc(text=[text], images=images, return_tensors="pt")
    assert list(ids) == ref["input_ids"][0].tolist()
    assert torch.equal(ids.vision.tensors["pixel_values"], ref["pixel_values"])
    q_ids = question_ids(tok, sample, sample.questions[0], opts)  # what a query-agnostic run appends
    assert list(ids)[spans["question"][0]:] == q_ids and extra["question_tokens"] == len(q_ids)
    runs = [ids.spans["image:0"], ids.spans["image:1"]]
    assert all(set(ref["input_ids"][0, s:e].tolist()) == {encoder.image_id} for s, e in runs)


@pytest.mark.parametrize("name", ["llava-onevision-qwen2-7b", "qwen2.5-vl-7b-instruct"])
def test_video_frames_get_frame_spans_and_decode_like_the_masked_full_model(name: str) -> None:
    model, encoder, tok = build(name)
    frames = [picture((56, 56), 20 + i) for i in range(4)]
    prompt = encoder.encode(tok, f"see {IMAGE} then {VIDEO} so: abcdefghijklmnopqrstuvwxyz",
                            [picture((56, 56), 0)], frames)
    n_frames = 4 if name.startswith("llava") else 2  # Qwen merges 2 frames per temporal patch
    assert [k for k in prompt.spans if k.startswith("frame:")] == [f"frame:{k}" for k in range(n_frames)]
    spans = [prompt.spans[f"frame:{k}"] for k in range(n_frames)]
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))  # consecutive, equal groups
    assert len({e - s for s, e in spans}) == 1 and prompt.spans["image:0"][1] < spans[0][0]
    decode = text(np.random.default_rng(4), 4)
    got, eng = engine_logits(model, EvictPattern(), 0.4, prompt, [], decode)
    ref = reference_logits(model, prompt, decode, kept_slots(eng, len(prompt)))
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", [*TINY, "opencua-7b"])
def test_offline_without_a_cached_copy_is_one_message(name: str, monkeypatch, tmp_path: Path) -> None:
    from kvbench.models import ModelLoadError, load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    spec = vl_configs()[name]
    with pytest.raises(ModelLoadError) as err:
        load_model(OmegaConf.create(spec), torch.device("cpu"))
    assert f"hf download {spec['pretrained']} --revision {spec['revision'] or 'main'}" in str(err.value)

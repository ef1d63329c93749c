"""Vision-language prompts: a sample's text with image / video placeholders -> a :class:`kvbench.engine.vl.Prompt`
(token ids, pixel inputs, named spans) in the model family's own layout.

* ``qwen2_vl`` (Qwen2-VL, Qwen2.5-VL): images through the model's image processor (its PIL variant works without
  torchvision), each placeholder expanded to ``<|vision_start|>`` + one ``<|image_pad|>`` per merged patch +
  ``<|vision_end|>`` (:func:`kvbench.tasks.vision.qwen_vl_inputs`, tested equal to the transformers processor);
  video frames (decoded with PyAV by the tasks) resized with the processor's ``smart_resize`` to multiples of
  patch x merge and laid out as the video processor does (:func:`kvbench.tasks.vision.patchify_video`). Deviation:
  the frames' pixel limits are those of the model's ``video_preprocessor_config.json`` when it has one, else of
  its image processor; Qwen2.5-VL's ``second_per_grid_ts`` is ``temporal_patch_size / fps`` with the
  processor's default fps 2.0. Where torchvision imports (GPU nodes), the model's own video processor
  (``AutoVideoProcessor``, ``do_sample_frames=False``: the task already sampled the frames) makes the pixels and
  grid instead, and this hand layout is not used (``tests/test_vl_video_processor.py`` compares the two there).
  Spans: ``image:<k>`` per image, ``frame:<k>`` per temporal patch (two frames merged into one group of tokens).
* ``llava`` (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision): the transformers processor expands ``<image>`` (a PIL image
  processor); ``image:<k>`` is the k-th run of image tokens. LLaVA-OneVision video: frames resized (bicubic) to the
  image processor's size, rescaled and normalised with its mean / std (deviation: the video processor's own, which
  needs torchvision, is used where torchvision imports), ``pixel_values_videos`` (1, F, C, H, W), and ``<video>``
  expanded to F x ceil(side / 2)^2 + 1 tokens as the processor does (each frame's patch grid pooled 2 x 2, one
  newline token at the end); ``frame:<k>`` = frame k's pooled tokens. Video for LLaVA-1.5 / NeXT (no video in
  those models) is refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvbench.engine.vl import Prompt, VisionInputs, frame_spans, image_spans
from kvbench.errors import UsageError
from kvbench.tasks.base import IMAGE, VIDEO
from kvbench.tasks.vision import load_image, qwen_vl_inputs

QWEN_TENSORS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
LLAVA_TENSORS = ("pixel_values", "image_sizes")


@dataclass
class VisionEncoder:
    """How one vision-language model's prompts are built (``RunOptions.vision``).

    Attributes:
        family: the engine adapter's family (``qwen2_vl`` or ``llava``).
        model_type: the top-level model type (``qwen2_5_vl`` adds ``second_per_grid_ts``).
        image_processor: the model's image processor (a PIL variant without torchvision).
        image_id, video_id: the placeholder token ids the processor expands to.
        processor: LLaVA: the transformers processor that expands ``<image>``; None for Qwen-VL.
        video_pixels: (min, max) pixels of a video frame (Qwen-VL ``smart_resize``).
        fps: frames per second the video's temporal groups are timed with (Qwen2.5-VL).
        video_processor: the model's video processor where torchvision imports (else frames are laid out here).
    """

    family: str
    model_type: str
    image_processor: Any
    image_id: int
    video_id: int | None = None
    processor: Any = None
    video_pixels: tuple[int, int] | None = None
    fps: float = 2.0
    video_processor: Any = None

    def encode(self, tok: Any, text: str, images: Sequence[Any], frames: Sequence[Any]) -> Prompt:
        """The prompt of ``text`` (with :data:`IMAGE` / :data:`VIDEO` placeholders) and its images / frames."""
        if self.family == "qwen2_vl":
            return self._qwen(tok, text, images, frames)
        return self._llava(text, images, frames)

    def _qwen(self, tok: Any, text: str, images: Sequence[Any], frames: Sequence[Any]) -> Prompt:
        ip = self.image_processor
        video = self.processed_video(frames) if len(frames) and self.video_processor is not None else None
        if len(frames) and video is None:
            frames = fit_frames(frames, ip.patch_size * ip.merge_size, *self.video_pixels)
        out = qwen_vl_inputs(text, images, frames, tok, ip, ip.merge_size, video)
        tensors = {k: out[k] for k in QWEN_TENSORS if k in out}
        if len(frames) and self.model_type == "qwen2_5_vl":
            tensors["second_per_grid_ts"] = torch.tensor([ip.temporal_patch_size / self.fps])
        ids = out["input_ids"][0]
        per_frame = [int(g[1] * g[2]) // ip.merge_size**2 for g in tensors.get("video_grid_thw", [])]
        spans = {**image_spans(ids, self.image_id), **frame_spans(ids, self.video_id, per_frame)}
        return Prompt(ids.tolist(), VisionInputs(tensors), spans)

    def _llava(self, text: str, images: Sequence[Any], frames: Sequence[Any]) -> Prompt:
        if (VIDEO in text) != bool(len(frames)):
            raise UsageError("a prompt needs exactly one video placeholder when the sample has frames")
        if len(frames) and self.model_type != "llava_onevision":
            raise UsageError(f"{self.model_type} models take no video; use LLaVA-OneVision or a Qwen2-VL-family model")
        if text.count(IMAGE) != len(images):
            raise UsageError(f"the prompt has {text.count(IMAGE)} image placeholders for {len(images)} images")
        if not len(frames):
            ids, tensors = self._llava_text(text, images, True)
            return Prompt(ids.tolist(), VisionInputs(tensors), image_spans(ids, self.image_id))
        video, per_frame = self._onevision_video(frames)
        before, after = text.split(VIDEO)  # tokenized apart: transformers' processor refuses <video> without videos
        if IMAGE in before and IMAGE in after:
            raise UsageError("LLaVA-OneVision prompts with images on both sides of the video are not supported")
        k = before.count(IMAGE)
        (a, ta), (b, tb) = self._llava_text(before, images[:k], True), self._llava_text(after, images[k:], False)
        ids = torch.cat([a, torch.full((len(frames) * per_frame + 1,), self.video_id), b])  # + the newline token
        spans = {**image_spans(ids, self.image_id), **frame_spans(ids, self.video_id, [per_frame], tail=1)}
        return Prompt(ids.tolist(), VisionInputs({**ta, **tb, **video}), spans)

    def _llava_text(self, text: str, images: Sequence[Any], special: bool) -> tuple[torch.Tensor, dict]:
        """Ids (n,) of a text with image placeholders (the processor expands them) and its pixel inputs."""
        if not images:
            return self.processor.tokenizer(text, add_special_tokens=special, return_tensors="pt")["input_ids"][0], {}
        enc = self.processor(text=[text.replace(IMAGE, self.processor.image_token)],
                             images=[load_image(i) for i in images], add_special_tokens=special, return_tensors="pt")
        return enc["input_ids"][0], {k: enc[k] for k in LLAVA_TENSORS if k in enc}

    def processed_video(self, frames: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The model's video processor on the (already sampled) frames: ``pixel_values_videos`` (+ Qwen-VL's
        ``video_grid_thw``)."""
        enc = self.video_processor(videos=[[load_image(f) for f in frames]], do_sample_frames=False,
                                   return_tensors="pt")
        return {k: enc[k] for k in ("pixel_values_videos", "video_grid_thw") if k in enc}

    def _onevision_video(self, frames: Sequence[Any]) -> tuple[dict[str, torch.Tensor], int]:
        """``{"pixel_values_videos": (1, F, C, H, W)}`` and the pooled tokens per frame, as LLaVA-OneVision's video
        processor and processor lay them out (the video processor itself where torchvision imports)."""
        import numpy as np
        from PIL import Image

        side = math.ceil(math.isqrt(self.processor.num_image_tokens) / 2)
        if self.video_processor is not None:
            return self.processed_video(frames), side * side
        ip = self.image_processor
        h, w = ip.size["height"], ip.size["width"]
        arr = np.stack([np.asarray(load_image(f).resize((w, h), Image.Resampling.BICUBIC), np.float32) / 255.0
                        for f in frames])  # (F, H, W, C)
        arr = (arr - np.asarray(ip.image_mean, np.float32)) / np.asarray(ip.image_std, np.float32)
        return {"pixel_values_videos": torch.from_numpy(arr).permute(0, 3, 1, 2)[None]}, side * side


def fit_frames(frames: Sequence[Any], factor: int, min_pixels: int, max_pixels: int) -> list[Any]:
    """Frames resized (bicubic) to the Qwen-VL processor's ``smart_resize`` size: sides multiples of ``factor``,
    area within [min_pixels, max_pixels]."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    out = []
    for f in frames:
        img = load_image(f)
        h, w = smart_resize(img.height, img.width, factor, min_pixels, max_pixels)
        out.append(img if (w, h) == img.size else img.resize((w, h), Image.Resampling.BICUBIC))
    return out


def pixel_limits(source: str, image_processor: Any) -> tuple[int, int]:
    """(min, max) pixels of a video frame: ``video_preprocessor_config.json``'s, else the image processor's."""
    path = Path(source) / "video_preprocessor_config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    size = cfg.get("size") or {}
    lo = cfg.get("min_pixels") or size.get("shortest_edge") or image_processor.size["shortest_edge"]
    hi = cfg.get("max_pixels") or size.get("longest_edge") or image_processor.size["longest_edge"]
    return int(lo), int(hi)


def takes_video(family: str, model_type: str) -> bool:
    """Whether a vision-language model takes video (Qwen2-VL family, LLaVA-OneVision)."""
    return family == "qwen2_vl" or model_type == "llava_onevision"


def vision_encoder(model: Any, tok: Any, image_processor: Any, source: str, processor: Any = None,
                   video_processor: Any = None) -> VisionEncoder:
    """The encoder of a loaded vision-language model (its adapter's family, placeholder ids, pixel limits)."""
    from kvbench.engine.adapters import adapter_for

    adapter = adapter_for(model)
    if not adapter.vision:
        raise UsageError(f"model type {model.config.model_type!r} is not a vision-language model kvbench can feed "
                         "images (family: vl needs a Qwen2-VL-family or LLaVA-family model)")
    image_id, video_id = adapter.vision_ids
    limits = pixel_limits(source, image_processor) if adapter.family == "qwen2_vl" else None
    return VisionEncoder(adapter.family, model.config.model_type, image_processor, image_id, video_id, processor,
                         limits, video_processor=video_processor)

"""Images and video frames for vision-language tasks: opening screenshots, uniform frame sampling, PyAV decoding.

Frames are decoded with PyAV (``av``, FFmpeg bindings from the package index; no torchvision needed). Uniform
sampling picks ``np.linspace(0, n_frames - 1, k).round()`` frame indices, the uniform sampler of lmms-eval's
Video-MME task and of LongVA / LLaVA-OneVision's video loaders (ZipVL evaluates LongVA-7B with 64 and 128 such
frames); for a video with fewer than ``k`` frames every frame is used once, in order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvbench.errors import UsageError


def load_image(ref: Any) -> Any:
    """An RGB ``PIL.Image`` from a path or an image (``Sample.images`` entries); one clear error if unreadable."""
    from PIL import Image

    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    try:
        with Image.open(Path(ref)) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot open image {ref}: {err}") from err


def image_size(ref: Any) -> tuple[int, int]:
    """``(width, height)`` of an image or image file, read from the header only."""
    from PIL import Image

    if isinstance(ref, Image.Image):
        return ref.size
    try:
        with Image.open(Path(ref)) as img:
            return img.size
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot open image {ref}: {err}") from err


def uniform_indices(n_frames: int, k: int) -> list[int]:
    """``k`` uniformly spaced frame indices over ``n_frames`` (first and last included); all frames if fewer."""
    if k < 1:
        raise UsageError(f"the number of sampled frames must be positive, got {k}")
    if n_frames <= k:
        return list(range(n_frames))
    return [int(i) for i in np.linspace(0, n_frames - 1, k).round()]


def count_frames(path: str | os.PathLike) -> int:
    """The number of frames of the first video stream (decoded to count when the container does not say)."""

    with _open(path) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for _ in container.decode(stream))


def _open(path: str | os.PathLike) -> Any:
    import av

    try:
        return av.open(str(path))
    except (OSError, av.error.FFmpegError) as err:
        raise UsageError(f"cannot open video {path}: {err}") from err


def decode_frames(path: str | os.PathLike, indices: Sequence[int]) -> list[Any]:
    """The frames at ``indices`` (sorted, as RGB ``PIL.Image``) of the first video stream, in one decoding pass."""
    wanted = sorted(set(indices))
    out: dict[int, Any] = {}
    with _open(path) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i in wanted:
                out[i] = frame.to_image().convert("RGB")
            if i >= wanted[-1]:
                break
    missing = [i for i in wanted if i not in out]
    if missing:
        raise UsageError(f"video {path} has no frame {missing[0]} (decoded {len(out)} of {len(wanted)} wanted)")
    return [out[i] for i in indices]


@dataclass
class VideoFrames(Sequence):
    """``num_frames`` uniformly sampled frames of a video file, decoded on first access (``Sample.frames``).

    Loading a benchmark only opens each video's header; the pixels are decoded when a prompt is built."""

    path: str
    num_frames: int
    total: int | None = None  # frames in the file (counted on first use when None)
    _cache: list[Any] | None = field(default=None, repr=False, compare=False)

    def indices(self) -> list[int]:
        if self.total is None:
            self.total = count_frames(self.path)
        return uniform_indices(self.total, self.num_frames)

    def _frames(self) -> list[Any]:
        if self._cache is None:
            self._cache = decode_frames(self.path, self.indices())
        return self._cache

    def __len__(self) -> int:
        return len(self.indices())

    def __getitem__(self, i: Any) -> Any:
        return self._frames()[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._frames())

    def release(self) -> None:
        """Drop the decoded pixels (they are decoded again on the next access)."""
        self._cache = None


def write_video(path: str | os.PathLike, frames: Sequence[Any], fps: int = 4) -> Path:
    """Write RGB frames (``PIL.Image`` or ``uint8 [H, W, 3]``) as an H.264 (or MPEG-4) video with PyAV."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = [np.asarray(f, dtype=np.uint8) for f in frames]
    height, width = arrays[0].shape[:2]
    with av.open(str(path), mode="w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "0", "preset": "ultrafast"}  # lossless-ish: frames decode back to ~the input
        for arr in arrays:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ---------------------------------------------------------------- Qwen2-VL inputs without torchvision
def patchify_video(frames: Sequence[Any], patch: int = 14, merge: int = 2, temporal: int = 2,
                   mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0)
                   ) -> tuple[Any, Any]:
    """Frames -> ``(pixel_values_videos [gt*gh*gw, C*temporal*patch*patch], video_grid_thw [[gt, gh, gw]])``, the
    flat layout of the Qwen2-VL video processor (frames rescaled to [0, 1] and normalised; the last frame is
    repeated to a multiple of ``temporal``; sides must be multiples of ``patch * merge``)."""
    import torch

    arr = np.stack([np.asarray(load_image(f), dtype=np.float32) / 255.0 for f in frames])  # [T, H, W, C]
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    if len(arr) % temporal:
        arr = np.concatenate([arr, np.repeat(arr[-1:], temporal - len(arr) % temporal, axis=0)])
    v = torch.from_numpy(arr).permute(0, 3, 1, 2)  # [T, C, H, W]
    t, c, h, w = v.shape
    if h % (patch * merge) or w % (patch * merge):
        raise UsageError(f"video frames of {w}x{h} pixels: sides must be multiples of {patch * merge}")
    gt, gh, gw = t // temporal, h // patch, w // patch
    v = v.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    v = v.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # gt, gh/m, gw/m, m, m, C, temporal, p, p
    return v.reshape(gt * gh * gw, c * temporal * patch * patch), torch.tensor([[gt, gh, gw]])


def qwen_vl_inputs(text: str, images: Sequence[Any], frames: Sequence[Any], tokenizer: Any, image_processor: Any,
                   merge: int = 2, video: dict[str, Any] | None = None) -> dict[str, Any]:
    """Model inputs for a prompt with :data:`~kvbench.tasks.base.IMAGE` / ``VIDEO`` placeholders: each expanded
    to ``<|vision_start|>`` + one pad token per merged patch + ``<|vision_end|>``, as Qwen2-VL's processor does.
    ``video``: the frames' ``pixel_values_videos`` / ``video_grid_thw`` from the model's video processor (else the
    frames are laid out by :func:`patchify_video`)."""
    from kvbench.tasks.base import IMAGE, VIDEO

    out: dict[str, Any] = {}
    pieces = text.split(IMAGE)
    if len(pieces) - 1 != len(images):
        raise UsageError(f"the prompt has {len(pieces) - 1} image placeholders for {len(images)} images")
    if images:
        enc = image_processor(images=[load_image(i) for i in images], return_tensors="pt")
        out["pixel_values"], out["image_grid_thw"] = enc["pixel_values"], enc["image_grid_thw"]
        counts = [int(g.prod()) // merge**2 for g in enc["image_grid_thw"]]
        text = pieces[0] + "".join(f"<|vision_start|>{'<|image_pad|>' * n}<|vision_end|>" + rest
                                   for n, rest in zip(counts, pieces[1:], strict=True))
    if (VIDEO in text) != bool(len(frames)):
        raise UsageError("a prompt needs exactly one video placeholder when the sample has frames")
    if len(frames):
        pv, thw = (video["pixel_values_videos"], video["video_grid_thw"]) if video else patchify_video(
            frames, image_processor.patch_size, merge, image_processor.temporal_patch_size,
            image_processor.image_mean, image_processor.image_std)
        out["pixel_values_videos"], out["video_grid_thw"] = pv, thw
        text = text.replace(VIDEO, f"<|vision_start|>{'<|video_pad|>' * (int(thw.prod()) // merge**2)}<|vision_end|>")
    enc = tokenizer(text, return_tensors="pt")
    ids = enc["input_ids"]
    out.update(input_ids=ids, attention_mask=enc["attention_mask"])
    if token_types_required():
        image_id, video_id = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
        out["mm_token_type_ids"] = (ids == image_id).long() + 2 * (ids == video_id).long()
    return out


def token_types_required() -> bool:
    """transformers 5 Qwen-VL models take (and need) ``mm_token_type_ids`` (``kvbench.engine.vl.TOKEN_TYPES``)."""
    from kvbench.engine.vl import TOKEN_TYPES

    return TOKEN_TYPES


def load_vl(path: str | os.PathLike) -> tuple[Any, tuple[Any, Any]]:
    """``(model, (tokenizer, image_processor))`` of a local Qwen2-VL-family directory (PIL image processor)."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype="float32").eval()
    return model, (AutoTokenizer.from_pretrained(str(path)), AutoImageProcessor.from_pretrained(str(path)))


def generate_answer(model: Any, processor: tuple[Any, Any], sample: Any, question: Any, max_new_tokens: int = 8
                    ) -> str:
    """Plain transformers greedy ``generate()`` (full cache) on ``context + question`` of a sample."""
    import torch

    tok, ip = processor
    inputs = qwen_vl_inputs(sample.context + question.text, sample.images, sample.frames, tok, ip)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

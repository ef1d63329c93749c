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

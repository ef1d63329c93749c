"""Vision-language inputs as the engine sees them: a prompt's token ids with the pixel inputs its vision tokens
stand for, M-RoPE positions, and the named image / frame spans of the cache.

The processor expands every image (or video) placeholder into one token per merged patch, so cache slot i = input
position i. Only the language model's attention runs through the engine; the vision tower keeps its own.

Positions (Qwen2-VL family, M-RoPE): the prefill's 3-D positions come from the model's own ``get_rope_index``, which
also gives ``rope_deltas`` = (largest prefill position + 1) - prompt length. Every later token (a question appended
over a compressed context, a decoded token, a probe) is at ``logical index + rope_deltas`` on all three axes, where
the logical index counts every token seen (evicted or not): eviction never shifts a position, and a rollback
restores the logical length. The positions are always passed to the model as a (3, 1, n) tensor: transformers
turns 2-D position ids into three identical rows without the deltas.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers
from torch import Tensor

from kvbench.errors import UsageError

#: transformers 5 Qwen-VL models take (and need, for ``get_rope_index``) ``mm_token_type_ids`` (0 text, 1 image,
#: 2 video); 4.x has no such input and refuses it.
TOKEN_TYPES = int(transformers.__version__.split(".")[0]) >= 5


def token_types(ids: Tensor, image_id: int | None, video_id: int | None) -> Tensor:
    """(1, n) ``mm_token_type_ids`` of ids (n,): 1 at image tokens, 2 at video tokens, 0 elsewhere."""
    return ((ids == image_id).long() + 2 * (ids == video_id).long())[None]


@dataclass
class VisionInputs:
    """The pixel inputs of one prompt, as the model's forward takes them (``pixel_values``, ``image_grid_thw``,
    ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``, ``image_sizes``, ...), and the number of
    frames each video's temporal group merges (Qwen2-VL: ``temporal_patch_size``) for the frame spans."""

    tensors: dict[str, Tensor] = field(default_factory=dict)

    def to(self, device: torch.device) -> dict[str, Tensor]:
        return {k: v.to(device) for k, v in self.tensors.items()}


class Prompt(list):
    """A prompt's token ids (a ``list[int]``) with the :class:`VisionInputs` its vision tokens stand for and their
    named spans (``image:<k>``, ``frame:<k>``); a plain list (text) has none. Slicing or concatenating gives a plain
    list: the vision inputs belong to the whole prompt (they go with its first, and only, prefill forward)."""

    def __init__(self, ids: list[int], vision: VisionInputs, spans: dict[str, tuple[int, int]]) -> None:
        super().__init__(ids)
        self.vision = vision
        self.spans = spans


def token_runs(ids: Tensor, token_id: int) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of ``token_id`` in ids (n,), in order."""
    hit = torch.cat([torch.zeros(1, dtype=torch.bool), ids == token_id, torch.zeros(1, dtype=torch.bool)])
    edges = (hit[1:].int() - hit[:-1].int()).nonzero().flatten().tolist()  # starts (+1) and ends (-1) alternate
    return list(zip(edges[::2], edges[1::2], strict=True))


def image_spans(ids: Tensor, image_id: int, offset: int = 0) -> dict[str, tuple[int, int]]:
    """``image:<k>`` -> [start, end) of the k-th image's tokens (one contiguous run per image), cache coordinates."""
    return {f"image:{k}": (offset + s, offset + e) for k, (s, e) in enumerate(token_runs(ids, image_id))}


def frame_spans(ids: Tensor, video_id: int | None, tokens_per_frame: list[int], offset: int = 0, tail: int = 0
                ) -> dict[str, tuple[int, int]]:
    """``frame:<k>`` -> [start, end) of the k-th frame group's tokens, in order over all videos: each video run is
    cut into consecutive groups of ``tokens_per_frame[v]`` tokens (Qwen2-VL: one group per temporal patch); the last
    ``tail`` tokens of a run belong to no frame (LLaVA-OneVision's closing newline token)."""
    runs = token_runs(ids, video_id) if video_id is not None else []
    if len(runs) != len(tokens_per_frame):
        raise UsageError(f"the prompt has {len(runs)} video token runs for {len(tokens_per_frame)} videos")
    spans: dict[str, tuple[int, int]] = {}
    for (s, e), per in zip(runs, tokens_per_frame, strict=True):
        e -= tail
        for a in range(s, e, per):
            spans[f"frame:{len(spans)}"] = (offset + a, offset + min(a + per, e))
    return spans


def mrope_positions(start: int, n: int, delta: int, device: torch.device) -> Tensor:
    """(3, 1, n) M-RoPE positions of n text tokens after ``start`` logical tokens: ``start + i + delta`` on t/h/w."""
    return (torch.arange(start, start + n, device=device) + delta).view(1, 1, n).expand(3, 1, n)


def check_no_vision_tokens(ids: Tensor, token_ids: tuple[int | None, ...]) -> None:
    """Vision placeholder tokens without their pixel inputs would be embedded as plain tokens (the image silently
    dropped): one clear error instead."""
    found = [t for t in token_ids if t is not None and bool((ids == t).any())]
    if found:
        raise UsageError(f"the tokens {found} are a vision-language model's image/video placeholders, but no pixel "
                         "inputs came with them (a prompt cut into blocks, or image placeholders typed into a text "
                         "task); their images would be dropped silently")

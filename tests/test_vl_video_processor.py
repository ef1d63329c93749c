"""Video frames through the model's own video processor where torchvision imports (GPU nodes), and through
kvbench's layout of the frames elsewhere (this machine): the encoder takes the processor's pixels and grid when it
has one; where torchvision imports, the two layouts are compared on the tiny Qwen2.5-VL."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_adapters_vl_configs import QWEN_IMAGE, build, picture

from kvbench.models import TORCHVISION
from kvbench.multimodal import takes_video
from kvbench.tasks.base import VIDEO

FRAMES = [picture((56, 56), 20 + i) for i in range(4)]
TEXT = f"watch {VIDEO} and say: abc"


class StubVideoProcessor:
    """Records its call and returns a fixed Qwen-VL video layout (1 temporal group of 4 x 4 patches)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, videos, **kwargs):  # noqa: ANN001, ANN003, ANN204
        self.calls.append({"videos": videos, **kwargs})
        return {"pixel_values_videos": torch.full((16, 3 * 2 * 14 * 14), 0.25),
                "video_grid_thw": torch.tensor([[1, 4, 4]])}


def test_the_encoder_uses_the_video_processors_pixels_and_grid_when_it_has_one() -> None:
    _, encoder, tok = build("qwen2.5-vl-7b-instruct")
    stub = StubVideoProcessor()
    prompt = dataclasses.replace(encoder, video_processor=stub).encode(tok, TEXT, [], FRAMES)
    (call,) = stub.calls
    assert call["do_sample_frames"] is False and len(call["videos"][0]) == 4  # the task's frames, not resampled
    assert torch.equal(prompt.vision.tensors["pixel_values_videos"], torch.full((16, 3 * 2 * 14 * 14), 0.25))
    assert prompt.count(encoder.video_id) == 16 // 4  # one pad per merged 2 x 2 patch of the grid
    own = encoder.encode(tok, TEXT, [], FRAMES)  # no video processor: kvbench's layout (2 groups of 2 x 2 merged)
    assert own.vision.tensors["video_grid_thw"].tolist() == [[2, 4, 4]]


def test_which_models_take_video() -> None:
    assert takes_video("qwen2_vl", "qwen2_5_vl") and takes_video("llava", "llava_onevision")
    assert not takes_video("llava", "llava") and not takes_video("llava", "llava_next")


@pytest.mark.skipif(not TORCHVISION, reason="transformers' video processors need torchvision (GPU nodes)")
def test_kvbench_layout_equals_the_qwen_video_processor() -> None:
    from transformers import Qwen2VLVideoProcessor

    _, encoder, tok = build("qwen2.5-vl-7b-instruct")
    vp = Qwen2VLVideoProcessor(size=QWEN_IMAGE["size"], patch_size=14, merge_size=2, temporal_patch_size=2)
    ours = encoder.encode(tok, TEXT, [], FRAMES)
    theirs = dataclasses.replace(encoder, video_processor=vp).encode(tok, TEXT, [], FRAMES)
    assert list(ours) == list(theirs) and ours.spans == theirs.spans
    assert torch.equal(ours.vision.tensors["video_grid_thw"], theirs.vision.tensors["video_grid_thw"])
    torch.testing.assert_close(ours.vision.tensors["pixel_values_videos"], theirs.vision.tensors["pixel_values_videos"],
                               atol=0.05, rtol=0)  # resampling of the two resize paths

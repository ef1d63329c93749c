"""synth_gui / synth_video: deterministic episodes with the promised structure, and the vision tower of
kvbench-tiny-vl decodes the widget pixel code into the key / value codes the build script writes down."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from kvbench.errors import UsageError
from kvbench.models import resolve_source
from kvbench.tasks import synth_gui, synth_video
from kvbench.tasks.base import IMAGE, VIDEO
from kvbench.tasks.vision import load_vl, qwen_vl_inputs

ROOT = Path(__file__).resolve().parents[1]


def test_gui_episodes_are_deterministic_and_mostly_identical() -> None:
    a, b = synth_gui.make_samples(n_samples=2), synth_gui.make_samples(n_samples=2)
    assert [np.asarray(i).tobytes() for i in a[1].images] == [np.asarray(i).tobytes() for i in b[1].images]
    s = a[0]
    assert len(s.images) == 8 and s.context.count(IMAGE) == 8 and s.images[0].size == (196, 196)
    shots = [np.asarray(i) for i in s.images]
    for prev, cur in zip(shots, shots[1:], strict=False):
        cells = (prev != cur).reshape(7, 28, 7, 28, 3).any(axis=(1, 3, 4))
        assert 1 <= cells.sum() <= 2  # the changed widget (+ the previous screen's marker cleared)
    assert [q.id for q in s.questions] == ["current", "changed"]
    assert all(q.answers[0].split()[0] == "is" and q.answers[0].split()[1] in synth_gui.VALUES for q in s.questions)
    assert s.questions[0].text.endswith(tuple(synth_gui.LABELS)) and s.questions[1].text.endswith("changed")
    with pytest.raises(UsageError, match="n_screens"):
        synth_gui.make_samples(n_samples=1, n_screens=1)


def test_video_has_one_event_in_one_frame_pair() -> None:
    s = synth_video.make_samples(n_samples=1)[0]
    assert len(s.frames) == 32 and s.context.count(VIDEO) == 1
    marker = [np.asarray(f)[:, :, 0].reshape(4, 28, 4, 28)[:, :2, :, 14:16].any() for f in s.frames]
    first = s.questions[0].meta["event_frame"]
    assert [i for i, m in enumerate(marker) if m] == [first, first + 1]
    assert s.questions[0].answers[0] in {f"is {x}" for x in synth_gui.LETTERS}


def test_vision_tower_decodes_the_widget_code() -> None:
    spec = importlib.util.spec_from_file_location("build_tiny_vl", ROOT / "scripts" / "build_tiny_vl.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    model, (tok, ip) = load_vl(resolve_source("embedded:kvbench-tiny-vl"))
    labels = [[5, 17], [30, 48]]
    values = [[0, 3], [15, 19]]
    img = synth_gui.render(labels, values, {(1, 0)})
    inp = qwen_vl_inputs(IMAGE, [img], [], tok, ip)
    with torch.no_grad():
        feats = model.model.get_image_features(inp["pixel_values"], inp["image_grid_thw"]).pooler_output[0]
    codes = build.key_codes(torch.Generator().manual_seed(0))
    assert feats.shape == (4, 256)
    for t, (label, value, changed) in enumerate([(5, 0, 0), (17, 3, 0), (30, 15, 1), (48, 19, 0)]):
        want_key = codes[label] + changed * codes[synth_gui.CHANGED_CODE]
        assert torch.allclose(feats[t, build.KEY], want_key, atol=1e-3)
        val = feats[t, build.VAL]
        assert val.argmax().item() == value and val.max().item() == pytest.approx(1, abs=1e-3)
        assert feats[t, build.BIAS].item() == pytest.approx(build.BIAS_VALUE, abs=1e-3)

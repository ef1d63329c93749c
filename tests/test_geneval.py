"""GenEval's scorer (kvbench/var/geneval.py) on hand cases from the authors' rules (evaluate_images.py,
summary_scores.py), its detector and colour classifier on tiny models built from configs, the metadata file
checks, and a GenEval run of kvbench-tiny-infinity on the fixture metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from kvbench.errors import UsageError
from kvbench.tasks.geneval import CHECKSUM, load_metadata
from kvbench.var.geneval import (
    COLORS,
    OBJECTS,
    ClipColors,
    Mask2FormerDetector,
    Settings,
    evaluate,
    iou,
    keep,
    mask_box,
    relative_position,
    summary,
)
from kvbench.var.metrics import load_clip

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "geneval" / "evaluation_metadata.jsonl"
S = Settings()
IMAGE = Image.new("RGB", (100, 100))


def det(x0: float, y0: float, x1: float, y1: float, score: float = 0.95):
    return (np.array([x0, y0, x1, y1, score]), None)


def no_colors(*_):  # noqa: ANN002, ANN201
    raise AssertionError("no colour asked")


def test_relative_position_shrinks_the_offset_by_the_boxes_sizes() -> None:
    a, b = det(0, 40, 20, 60), det(60, 40, 80, 60)  # A left of B, same row: offset (-60, 0), shrink 0.1 * 40
    assert relative_position(a, b, 0.1) == {"left of"} and relative_position(b, a, 0.1) == {"right of"}
    assert relative_position(det(40, 0, 60, 20), det(40, 60, 60, 80), 0.1) == {"above"}  # y grows downwards
    assert relative_position(det(0, 0, 20, 20), det(60, 60, 80, 80), 0.1) == {"left of", "above"}  # diagonal: both
    assert relative_position(det(50, 0, 70, 20), det(60, 60, 80, 80), 0.1) == {"above"}  # dx = -6 / 60.8: not left
    assert relative_position(det(0, 0, 20, 20), det(10, 0, 30, 20), 0.3) == set()  # 10 < 0.3 * 40: too close
    assert relative_position(det(0, 0, 20, 20), det(5, 90, 25, 110), 0.1) == {"above"}


def test_keep_thresholds_orders_limits_and_deduplicates() -> None:
    found = {"cat": [det(0, 0, 10, 10, 0.5), det(0, 0, 10, 10, 0.95), det(50, 50, 60, 60, 0.2)],
             "dog": [det(0, 0, 5, 5, 0.1)]}
    kept = keep(found, "single_object", S)
    assert list(kept) == ["cat"] and [d[0][4] for d in kept["cat"]] == [0.95, 0.5]  # dog below 0.3: absent
    assert [d[0][4] for d in keep(found, "counting", S)["cat"]] == [0.95]  # counting: 0.9
    assert len(keep(found, "single_object", Settings(max_overlap=0.5))["cat"]) == 1  # the same box: one
    assert len(keep(found, "single_object", Settings(max_objects=1))["cat"]) == 1
    assert iou(det(0, 0, 9, 9)[0], det(0, 0, 9, 9)[0]) == 1.0 and iou(det(0, 0, 9, 9)[0], det(10, 10, 19, 19)[0]) == 0


def test_evaluate_counting_exclusion_position_and_colour() -> None:
    count = {"tag": "counting", "include": [{"class": "apple", "count": 3}],
             "exclude": [{"class": "apple", "count": 4}], "prompt": "three apples"}
    apples = [det(i * 20, 0, i * 20 + 10, 10) for i in range(4)]
    assert evaluate(IMAGE, {"apple": apples[:3]}, count, no_colors, S) == (True, [])
    ok, why = evaluate(IMAGE, {"apple": apples}, count, no_colors, S)
    assert not ok and why == ["expected apple<4, found 4"]
    ok, why = evaluate(IMAGE, {"apple": apples[:2]}, count, no_colors, S)
    assert not ok and why == ["expected apple>=3, found 2"]
    above = {"tag": "position", "include": [{"class": "chair", "count": 1},
                                            {"class": "cat", "count": 1, "position": ["above", 0]}], "prompt": "p"}
    assert evaluate(IMAGE, {"chair": [det(40, 60, 60, 80)], "cat": [det(40, 0, 60, 20)]}, above, no_colors, S)[0]
    ok, why = evaluate(IMAGE, {"chair": [det(40, 0, 60, 20)], "cat": [det(40, 60, 60, 80)]}, above, no_colors, S)
    assert not ok and why == ["expected cat above target, found below target"]
    ok, why = evaluate(IMAGE, {"cat": [det(40, 0, 60, 20)]}, above, no_colors, S)  # the target clause failed
    assert why == ["expected chair>=1, found 0", "no target for cat to be above"]
    colour = {"tag": "colors", "include": [{"class": "bus", "count": 1, "color": "green"}], "prompt": "p"}
    assert evaluate(IMAGE, {"bus": [det(0, 0, 9, 9)]}, colour, lambda im, found, name: ["green"], S)[0]
    ok, why = evaluate(IMAGE, {"bus": [det(0, 0, 9, 9)]}, colour, lambda im, found, name: ["red"], S)
    assert not ok and why == ["expected green bus>=1, found 0 green; and 1 red"]


def test_summary_averages_the_tags_not_the_images() -> None:
    rows = [{"tag": "counting", "prompt": "a", "correct": True}, {"tag": "counting", "prompt": "a", "correct": False},
            {"tag": "counting", "prompt": "b", "correct": False}, {"tag": "colors", "prompt": "c", "correct": True}]
    s = summary(rows)
    assert s["by_tag"] == {"counting": pytest.approx(1 / 3), "colors": 1.0}
    assert s["overall"] == pytest.approx((1 / 3 + 1) / 2) and s["correct_images"] == 0.5
    assert s["correct_prompts"] == pytest.approx(2 / 3) and s["images"] == 4


def test_metadata_file_is_checked(tmp_path) -> None:
    rows = load_metadata(FIXTURE)
    assert {r["tag"] for r in rows} == {"single_object", "two_object", "counting", "colors", "position",
                                        "color_attr"}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"tag": "styles", "prompt": "x", "include": [1]}) + "\n")
    with pytest.raises(UsageError, match="not GenEval metadata"):
        load_metadata(tmp_path / "bad.jsonl")
    with pytest.raises(UsageError, match="prepare_data.py geneval"):
        load_metadata(tmp_path / "missing.jsonl")
    assert CHECKSUM.size == 85_209  # the release file: 553 lines


def test_mask_box_is_mmdetections_mask2bbox() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:9] = True
    assert mask_box(mask) == (3.0, 2.0, 9.0, 5.0)


def test_mask2former_detector_returns_coco_names_boxes_and_masks(tiny_mask2former) -> None:
    image = Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype("uint8"))
    found = Mask2FormerDetector(str(tiny_mask2former))(image)
    dets = [d for ds in found.values() for d in ds]
    assert found and set(found) <= set(OBJECTS) and len(dets) <= 8  # at most one per query
    for box, mask in dets:
        assert mask.shape == (48, 64) and mask.any() and mask_box(mask) == tuple(box[:4]) and 0 <= box[4] <= 1
    with pytest.raises(UsageError, match="could not be loaded"):
        Mask2FormerDetector(str(tiny_mask2former / "missing"))


def test_colour_crops_grey_out_the_background_and_classify_into_the_ten_colours(tiny_clip) -> None:
    colors = ClipColors(load_clip(str(tiny_clip)), S)
    image = Image.new("RGB", (20, 20), (255, 0, 0))
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:10, 5:10] = True
    crop = np.asarray(colors.crop(image, (np.array([0, 0, 20, 20, 1.0]), mask)))
    assert (crop[6, 6] == (255, 0, 0)).all() and (crop[0, 0] == (153, 153, 153)).all()  # #999 outside the mask
    assert np.asarray(colors.crop(image, (np.array([5, 5, 10, 10, 1.0]), mask))).shape == (5, 5, 3)
    got = colors(image, [(np.array([5, 5, 10, 10, 1.0]), mask), (np.array([0, 0, 20, 20, 1.0]), None)], "bus")
    assert len(got) == 2 and set(got) <= set(COLORS)
    head = colors.head("bus")
    assert head.shape == (16, len(COLORS)) and torch.allclose(head.norm(dim=0), torch.ones(len(COLORS)))


def test_a_geneval_run_scores_the_methods_and_the_full_caches_images(tmp_path, tiny_clip, tiny_mask2former) -> None:
    from kvbench.var.run import run, run_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=kvbench-tiny-infinity", "task=geneval", "method=snapkv", "budget=0.3", f"paths.results={tmp_path}",
            f"task.loader.data_dir={FIXTURE.parent}", f"task.geneval_detector={tiny_mask2former}",
            f"task.clip_model={tiny_clip}", "task.seeds=[0]", "task.geneval.threshold=0.0", "progress=false"])
    m = run(cfg)
    for key in ("geneval", "full_geneval"):
        assert m[key]["images"] == 6 and 0 <= m[key]["overall"] <= 1
        assert set(m[key]["by_tag"]) == {r["tag"] for r in load_metadata(FIXTURE)}
    out = run_dir(cfg)
    rows = [json.loads(x) for x in (out / "geneval.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in load_metadata(FIXTURE)]
    assert rows[0]["image"] == "seed0_prompt0.png" and (out / "images" / rows[0]["image"]).is_file()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        bad = compose("config", overrides=["model=kvbench-tiny-infinity", "task=geneval", f"paths.results={tmp_path}",
                                           f"task.loader.data_dir={FIXTURE.parent}", "task.clip_model=null"])
    with pytest.raises(UsageError, match="geneval needs"):
        run(bad)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        typo = compose("config", overrides=["model=kvbench-tiny-infinity", "task=geneval", f"paths.results={tmp_path}",
                                            f"task.loader.data_dir={FIXTURE.parent}", "+task.geneval.treshold=0.5"])
    with pytest.raises(UsageError, match="unknown GenEval options.*treshold"):
        run(typo)

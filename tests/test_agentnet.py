"""AgentNetBench: GUI-KV's step scorer and action parsers on hand cases from its code; the task's context layout.

The scorer and both parsers were also run side by side with the authors' own functions (GUI-KV @ b301d41) on
6,000 fuzzed outputs of both formats: identical parsed actions and scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kvbench.errors import UsageError
from kvbench.metrics import score_prediction
from kvbench.metrics.agentnet import evaluate_action, parse_actions, smart_resize_uitars, step_score
from kvbench.tasks import agentnetbench as anb

FIX = Path(__file__).parent / "fixtures" / "agentnetbench"
W, H = 1920, 1080  # UI-TARS smart_resize -> 1092 x 1932, OpenCUA the same


def click_gt(x: float, y: float, box: list[float] | None = None, kind: str = "click") -> dict:
    return {"type": kind, "params": {"position": {"x": x, "y": y}},
            "metadata": {"bboxes": [{"rel_bbox": box}] if box else []}}


def score(output: str, gt: dict, fmt: str = "uitars", alternatives: list | None = None) -> float:
    return step_score(parse_actions(output, fmt, W, H), [gt], alternatives or [])[0]


def test_smart_resize_is_the_qwen25vl_rounding() -> None:
    assert smart_resize_uitars(1080, 1920) == (1092, 1932)
    assert smart_resize_uitars(54, 96) == (224, 392)  # below min_pixels: scaled up to >= 100 * 28 * 28


def test_click_inside_box_near_and_far() -> None:
    out = "Thought: click OK.\nAction: click(start_box='(966,546)')"  # = (0.5, 0.5) of the resized image
    assert parse_actions(out, "uitars", W, H) == [("click", (0.5, 0.5))]
    assert score(out, click_gt(0.9, 0.9, [0.45, 0.45, 0.1, 0.1])) == 1.0  # inside the box (x, y, w, h)
    assert score(out, click_gt(0.51, 0.5)) == 1.0  # within 0.01 * sqrt(2) of the point
    d = math.hypot(0.1, 0.0)
    assert score(out, click_gt(0.6, 0.5)) == pytest.approx(math.exp(-120 * (d - 0.01 * math.sqrt(2))))
    assert score("Action: click(point='<point>966 546</point>')", click_gt(0.5, 0.5)) == 1.0  # <point> form


def test_write_similarity_threshold_and_dead_newline_branch() -> None:
    gt = {"type": "write", "params": {"text": "hello world"}}
    assert score("Action: type(content='Hello World')", gt) == 1.0  # case-folded
    assert score("Action: type(content='hello worl')", gt) == 1.0  # similarity 10/11 >= 0.8
    assert score("Action: type(content='help')", gt) == pytest.approx((1 - 8 / 11) / 0.8)
    # the authors' 0.9 for a trailing-newline difference is computed after strip() and never happens
    assert evaluate_action(("write", "hello world\n"), gt) == 1.0


def test_hotkeys_press_scroll_terminate() -> None:
    ctrl_c = {"type": "hotkey", "params": {"keys": ["ctrl", "c"]}}
    assert score("pyautogui.hotkey('ctrl', 'c')", ctrl_c, "opencua") == 1.0
    assert score("pyautogui.hotkey('cmd', 'c')", ctrl_c, "opencua") == 1.0  # cmd -> ctrl
    assert score("pyautogui.hotkey('c', 'ctrl')", ctrl_c, "opencua") == 1.0  # a key set
    # UI-TARS hotkeys are rewritten ctrl -> control while the release says "ctrl": 0, as in the authors' code
    assert parse_actions("Action: hotkey(key='ctrl c')", "uitars", W, H) == [("hotkey", ["control", "c"])]
    assert score("Action: hotkey(key='ctrl c')", ctrl_c) == 0.0
    assert score("pyautogui.press('enter')", {"type": "press", "params": {"keys": ["enter"]}}, "opencua") == 1.0
    assert score("Action: scroll(point='<point>1 2</point>', direction='up')", {"type": "scroll", "params": {}}) == 1
    done = {"type": "terminate", "params": {"status": "success"}}
    assert score("Action: finished(content='successful')", done) == 1.0
    assert score("Action: finished(content='failure')", done) == 0.0
    assert score("computer.terminate(status='success')", done, "opencua") == 1.0


def test_alternatives_types_and_unparsable_outputs() -> None:
    write = {"type": "write", "params": {"text": "abc"}}
    alt = [[click_gt(0.2, 0.2, [0.1, 0.1, 0.2, 0.2])]]
    assert score("pyautogui.click(x=386.4, y=327.6)", write, "opencua", alt) == 1.0  # (0.2, 0.3): the alternative
    assert score("pyautogui.click(x=386.4, y=327.6)", write, "opencua") == 0.0
    triple = click_gt(0.5, 0.5, kind="tripleClick")
    assert score("computer.triple_click(x=966, y=546)", triple, "opencua") == 1.0  # triple_click -> tripleclick
    assert score("Action: click(start_box=(((", click_gt(0.5, 0.5)) == 0.0  # the authors' parse error
    assert score("I would click OK.", click_gt(0.5, 0.5)) == 0.0  # no "Action:"
    assert parse_actions("Action: wait()", "uitars", W, H) == []


def test_registered_metric_reads_the_step_json() -> None:
    ref = json.dumps({"ground_truth_actions": [click_gt(0.5, 0.5)], "alternative_options": []})
    got = score_prediction("Action: click(start_box='(966,546)')", [ref], ["agentnet_step"],
                           action_format="uitars", image_size=[W, H])
    assert got == {"agentnet_step": 1.0}


def test_step_layout_five_screenshots_ten_history_steps() -> None:
    traj = {"task_id": "t", "high_level_task_description": "do it",
            "steps": [{"image": f"{i}.png", "inner_monologue": {"observation": f"o{i}"}} for i in range(13)]}
    messages, images = anb.step_messages(traj, 12, Path("img"))
    assert images == [f"img/{i}.png" for i in (8, 9, 10, 11, 12)]  # current + 4 previous
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(assistant) == 10 and assistant[0].startswith("# Step 3:\n## Observation:\no2")
    own = {i: f"out{i}" for i in range(12)}
    messages, _ = anb.step_messages(traj, 12, Path("img"), own)
    assert messages[-2]["content"] == "# Step 12:\nStep 12:\nout11"  # the model's own output, GUI-KV's format
    assert messages[-1] == {"role": "user", "content": [{"type": "image"}]}


def test_fixture_loads_and_run_trajectory_feeds_outputs_back() -> None:
    samples = anb.load(FIX)
    assert [s.id for s in samples] == [f"s_fixture_a/{k}" for k in range(4)] + ["s_fixture_b/0", "s_fixture_b/1"]
    s = samples[3]
    assert len(s.images) == 4 and s.context.count("<|kvbench_image|>") == 4
    assert s.questions[0].text.startswith("You are a GUI agent.") and "Type hello world" in s.questions[0].text
    assert s.questions[0].meta["metric_kwargs"] == {"action_format": "uitars", "image_size": [96, 54]}
    traj = json.loads((FIX / "s_fixture_a.json").read_text())
    seen = []
    anb.run_trajectory(traj, FIX / "images", lambda smp: seen.append(smp.context) or f"ANSWER{len(seen)}")
    assert "Step 1:\nANSWER1" in seen[1] and "Step 2:\nANSWER2" in seen[2]
    with pytest.raises(UsageError, match="action_format"):
        anb.load(FIX, action_format="seeclick")


def test_history_model_rebuilds_each_step_from_the_earlier_raw_outputs() -> None:
    samples = anb.load(FIX, history="model")
    assert [s.meta["history_of"] for s in samples[:3]] == [[], ["s_fixture_a/0"], ["s_fixture_a/0", "s_fixture_a/1"]]
    assert anb.with_own_history(samples[0], {}) is samples[0]  # the first step has no history
    with pytest.raises(UsageError, match="s_fixture_a/1"):
        anb.with_own_history(samples[2], {"s_fixture_a/0": "x"})
    step = anb.with_own_history(samples[2], {"s_fixture_a/0": "OUT0", "s_fixture_a/1": "OUT1"})
    traj = json.loads((FIX / "s_fixture_a.json").read_text())
    ref = anb.step_sample(traj, 2, FIX / "images", own={0: "OUT0", 1: "OUT1"})
    assert step.id == samples[2].id and step.context == ref.context and step.messages == ref.messages
    assert "Step 1:\nOUT0" in step.context and "Step 2:\nOUT1" in step.context
    assert step.images == samples[2].images and step.questions[0].answers == samples[2].questions[0].answers
    ground_truth = anb.load(FIX)
    assert "history_of" not in ground_truth[2].meta and ground_truth[2].context == samples[2].context


def test_official_scores_follow_the_authors_tables() -> None:
    samples = anb.load(FIX)
    outputs = ["Action: click(start_box='(95,57)')",  # a: click on OK (0.24, 0.26) -> inside
               "nonsense",  # a: write, unparsable -> 0 and left out of the per-type table
               "Action: hotkey(key='ctrl s')",  # a: control -> 0
               "Action: finished(content='success')",  # a: 1
               "Action: left_double(start_box='(274,58)')",  # b: doubleclick on Cancel -> 1
               "Action: scroll(point='<point>1 1</point>', direction='down')"]  # b: 1
    records = []
    for s, out in zip(samples, outputs, strict=True):
        q = s.questions[0]
        records.append({"prediction": out, "references": q.answers, "meta": {**s.meta, **q.meta},
                        "scores": score_prediction(out, q.answers, ["agentnet_step"], **q.meta["metric_kwargs"])})
    assert [r["scores"]["agentnet_step"] for r in records] == [1, 0, 0, 1, 1, 1]
    got = anb.official_scores(records, {})
    assert got["step_accuracy"] == pytest.approx(100 * 4 / 6)
    assert got["average_trajectory_score"] == pytest.approx(100 * (2 / 4 + 2 / 2) / 2)
    assert got["action_type_counts"] == {"click": 1, "doubleclick": 1, "hotkey": 1, "scroll": 1, "terminate": 1}
    assert got["action_type_scores"]["hotkey"] == 0 and got["milestone_steps"] == 1 and got["milestone_score"] == 0

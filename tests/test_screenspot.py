"""ScreenSpot-v2 / -Pro: box formats of the releases, click extraction as GUI-KV's drivers, the official box test.

Click extraction and the box test were also run side by side with GUI-KV's functions on 5,000 fuzzed outputs of
both formats: identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbench.errors import UsageError
from kvbench.metrics import score_prediction
from kvbench.metrics.screenspot import click_point, inside
from kvbench.tasks import screenspot

FIX = Path(__file__).parent / "fixtures" / "screenspot"


def test_release_box_formats_are_normalised_corners() -> None:
    assert screenspot.target_box("v2", {"bbox": [10, 10, 30, 14]}, (100, 50)) == [0.1, 0.2, 0.4, 0.48]  # x, y, w, h
    assert screenspot.target_box("pro", {"bbox": [10, 10, 30, 14]}, (100, 50)) == [0.1, 0.2, 0.3, 0.28]  # corners


def test_click_points_of_both_formats() -> None:
    assert click_point("Action: click(point='<point>966 546</point>')", "uitars", 1920, 1080) == (0.5, 0.5)
    assert click_point("```python\npyautogui.click(x=966, y=546)\n```", "opencua", 1920, 1080) == (0.5, 0.5)
    assert click_point("pyautogui.write('a')\npyautogui.moveTo(966, 546)", "opencua", 1920, 1080) == (0.5, 0.5)
    assert click_point("pyautogui.click(x=966)", "opencua", 1920, 1080) is None  # one number: wrong format
    assert click_point("I cannot find it.", "uitars", 1920, 1080) is None
    assert inside((0.5, 0.5), [0.5, 0.4, 0.6, 0.5]) and not inside((0.5, 0.51), [0.5, 0.4, 0.6, 0.5])  # edges in


def test_metric_and_fixture_end_to_end() -> None:
    v2 = screenspot.load("v2", FIX / "v2")
    assert len(v2) == 6 and v2[0].images[0].endswith("mobile_0001.png") and v2[0].context == "<|kvbench_image|>"
    q = v2[0].questions[0]  # "open the mobile menu": box (10, 10)-(40, 24) of a 112 x 56 screenshot
    assert q.meta["category"] == "mobile/text" and json.loads(q.answers[0]) == pytest.approx([10 / 112, 10 / 56,
                                                                                              40 / 112, 24 / 56])
    # smart_resize(56, 112) = (196, 392): pixel (88, 56) of the resized image = (0.224, 0.286) -> inside
    hit = score_prediction("Action: click(point='<point>88 56</point>')", q.answers, ["screenspot_click"],
                           **q.meta["metric_kwargs"])
    miss = score_prediction("Action: click(point='<point>300 150</point>')", q.answers, ["screenspot_click"],
                            **q.meta["metric_kwargs"])
    assert hit == {"screenspot_click": 1.0} and miss == {"screenspot_click": 0.0}
    pro = screenspot.load("pro", FIX / "pro", action_format="opencua")
    assert [s.id for s in pro] == ["vscode_macos_0"] and pro[0].questions[0].meta["category"] == "macos/icon"
    with pytest.raises(UsageError, match="version"):
        screenspot.load("v3", FIX / "v2")


def test_official_scores_text_icon_and_guikv_macro() -> None:
    recs = [{"meta": {"split": s, "ui_type": t}, "scores": {"screenspot_click": v}}
            for s, t, v in (("mobile", "text", 1), ("mobile", "icon", 0), ("web", "text", 1), ("web", "text", 0),
                            ("web", "icon", 1))]
    got = screenspot.official_scores(recs, {"metrics": ["screenspot_click"]})
    assert got["accuracy"] == 60 and got["text_accuracy"] == pytest.approx(200 / 3) and got["icon_accuracy"] == 50
    assert got["guikv_macro"] == pytest.approx(((100 + 0) / 2 + (50 + 100) / 2) / 2)

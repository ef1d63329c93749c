"""ScreenSpot-v2 / ScreenSpot-Pro grounding: the predicted click must fall inside the target box.

Click extraction as GUI-KV's drivers (SalesforceAIResearch/GUI-KV @ b301d41, ``eval/screenspotv2_eval.py``,
``eval/screenspotpro_eval.py``): UI-TARS output through ``parse_action_to_structure_output`` (the first action's
first box argument, normalised by the ``smart_resize``-d image size); OpenCUA output through
``opencua_parse_action`` (the numbers of the first ``pyautogui.click / moveTo / dragTo / doubleClick / rightClick
/ middleClick / tripleClick`` or ``computer.tripleClick`` line, divided by OpenCUA's ``smart_resize``). The box
test is the official one (likaixin2000/ScreenSpot-Pro-GUI-Grounding ``eval_sample_positive_gt``): normalised
``x1 <= x <= x2 and y1 <= y <= y2``; an output without a point is ``wrong_format`` and scores 0.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from kvbench.metrics import metric
from kvbench.metrics.agentnet import ParseError, parse_uitars, smart_resize_opencua

CLICK_PREFIXES = ("pyautogui.click", "pyautogui.moveTo", "pyautogui.dragTo", "pyautogui.doubleClick",
                  "pyautogui.rightClick", "pyautogui.middleClick", "pyautogui.tripleClick", "computer.tripleClick")


def _opencua_point(output: str, width: int, height: int) -> tuple[float, float] | None:
    h, w = smart_resize_opencua(height, width)
    for line in (raw.strip() for raw in output.split("\n")):
        if line.startswith(CLICK_PREFIXES):
            nums = [float(n) for n in re.findall(r"[-+]?\d*\.\d+|[-+]?\d+", line)][:2]
            if len(nums) != 2:
                raise ParseError(f"not a point: {line}")  # the authors' ``x, y = coords`` fails
            return nums[0] / w, nums[1] / h
    return None


def _uitars_point(output: str, width: int, height: int) -> tuple[float, float] | None:
    actions = parse_uitars(output, width, height)
    if not actions or not actions[0]["action_inputs"]:
        return None
    point = ast.literal_eval(next(iter(actions[0]["action_inputs"].values())))
    return float(point[0]), float(point[1])


def click_point(output: str, action_format: str, width: int, height: int) -> tuple[float, float] | None:
    """The normalised click of a model output, or None (the drivers' ``wrong format``)."""
    readers = {"uitars": _uitars_point, "opencua": _opencua_point}
    if action_format not in readers:
        raise ValueError(f"unknown action_format {action_format!r}; choose uitars or opencua")
    try:
        return readers[action_format](output, width, height)
    except (ParseError, ValueError, SyntaxError, TypeError, IndexError, ZeroDivisionError, AttributeError):
        return None


def inside(point: tuple[float, float] | None, box: list[float]) -> bool:
    """``x1 <= x <= x2 and y1 <= y <= y2`` (normalised, edges included)."""
    return point is not None and box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


@metric("screenspot_click")
def screenspot_click(prediction: str, reference: str, action_format: str = "uitars",
                     image_size: tuple[int, int] | list[int] = (1920, 1080), **_: Any) -> float:
    """1 if the output's click lies in the target box; ``reference`` is the JSON normalised ``[x1, y1, x2, y2]``."""
    point = click_point(prediction, action_format, int(image_size[0]), int(image_size[1]))
    return float(inside(point, json.loads(reference)))

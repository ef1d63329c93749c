"""AgentNetBench step scoring and the UI-TARS / OpenCUA action parsers, as GUI-KV's evaluation does it.

Source: SalesforceAIResearch/GUI-KV @ b301d41, ``eval/agentnetbench_eval.py`` (``evaluate_action``, the main loop's
alternative retry, ``convert_ui_tars_to_agentnetbench_actions``), ``eval/ui_tars_utils.py``
(``parse_action_to_structure_output``, ``smart_resize``) and ``eval/opencua_utils.py``
(``parse_response_actions_opencua``, ``extract_actions``, its own ``smart_resize``). Re-implemented here; the
behaviour, quirks included, is the authors':

* A step scores its model's **first** parsed action against the **first** ground-truth action. Action types must
  match (``triple_click`` -> ``tripleclick``; case-folded), else the first alternative option of the predicted type
  is used as the ground truth; a 0 is then retried against every alternative's first action (best kept).
* Clicks (``click doubleclick rightclick tripleclick moveto dragto``): 1 inside any ``metadata.bboxes[].rel_bbox``
  (``[x, y, w, h]``, normalised, edges included), else 1 within ``0.01 * sqrt(2)`` of ``params.position``, else
  ``exp(-120 * (distance - 0.01 * sqrt(2)))``.
* ``write``: both texts lower-cased and stripped; equal -> 1 (the authors' 0.9 "trailing newline differs" branch
  runs after ``strip()`` and so can never fire); else edit similarity ``1 - editdistance / max_len``, 1 if >= 0.8
  else ``similarity / 0.8`` (python-``editdistance``, the package the authors import).
* ``press`` / ``hotkey``: lower-cased key *sets* equal. ``scroll``: type match only. ``terminate``: status equal.
* UI-TARS output (``Action: click(start_box='(x,y)')`` or ``<point>x y</point>``): absolute coordinates in the
  ``smart_resize``-d image (factor 28, 100*28*28 to 16384*28*28 pixels) divided by the resized width/height; its
  hotkeys are split on spaces with ``ctrl`` rewritten to ``control``; ``type(content='..\\n')`` becomes
  ``write`` (+ ``press enter``); ``finished`` -> ``terminate`` success/failure; ``wait`` -> no action.
* OpenCUA output: the lines starting with ``pyautogui.`` / ``computer.``; coordinates divided by OpenCUA's
  ``smart_resize`` of the screenshot; ``cmd``/``command`` -> ``ctrl``.
* An output that cannot be parsed (the authors' ``except``) or gives no action scores 0.
"""

from __future__ import annotations

import ast
import json
import math
import re
from typing import Any

from kvbench.metrics import metric

FACTOR = 28
MIN_PIXELS = 100 * 28 * 28
MAX_PIXELS = 16384 * 28 * 28
MAX_RATIO = 200
CLICKS = ("click", "doubleclick", "rightclick", "tripleclick", "moveto", "dragto")
ACTION_TYPES = CLICKS + ("write", "press", "hotkey", "scroll", "terminate")  # the authors' per-type table
THRESHOLD = 0.01 * math.sqrt(2)

Action = tuple  # (type, value): ("click", (x, y)), ("write", text), ("hotkey", [keys]), ("terminate", status)


class ParseError(ValueError):
    """A model output the authors' parser raises on (the step scores 0)."""


# ---------------------------------------------------------------- resizing (two slightly different copies)
def smart_resize_uitars(height: int, width: int) -> tuple[int, int]:
    """``ui_tars_utils.smart_resize``: sides rounded to multiples of 28 within [MIN_PIXELS, MAX_PIXELS]."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ParseError(f"absolute aspect ratio must be smaller than {MAX_RATIO}")
    h = max(FACTOR, round(height / FACTOR) * FACTOR)
    w = max(FACTOR, round(width / FACTOR) * FACTOR)
    if h * w > MAX_PIXELS:
        beta = math.sqrt(height * width / MAX_PIXELS)
        h, w = math.floor(height / beta / FACTOR) * FACTOR, math.floor(width / beta / FACTOR) * FACTOR
    elif h * w < MIN_PIXELS:
        beta = math.sqrt(MIN_PIXELS / (height * width))
        h, w = math.ceil(height * beta / FACTOR) * FACTOR, math.ceil(width * beta / FACTOR) * FACTOR
    return h, w


def smart_resize_opencua(height: int, width: int) -> tuple[int, int]:
    """``opencua_utils.smart_resize``: refuses sides below 28, ``max(1, ...)`` on the rounded sides."""
    if height < FACTOR or width < FACTOR:
        raise ParseError(f"height:{height} or width:{width} must be larger than factor:{FACTOR}")
    h = max(1, round(height / FACTOR)) * FACTOR
    w = max(1, round(width / FACTOR)) * FACTOR
    if h * w > MAX_PIXELS:
        beta = math.sqrt(height * width / MAX_PIXELS)
        h, w = max(1, math.floor(height / beta / FACTOR)) * FACTOR, max(1, math.floor(width / beta / FACTOR)) * FACTOR
    elif h * w < MIN_PIXELS:
        beta = math.sqrt(MIN_PIXELS / (height * width))
        h, w = math.ceil(height * beta / FACTOR) * FACTOR, math.ceil(width * beta / FACTOR) * FACTOR
    return h, w


# ---------------------------------------------------------------- UI-TARS
def _call(action: str) -> tuple[str | None, dict[str, Any]]:
    """``parse_action``: function name and constant keyword arguments of one call expression."""
    try:
        call = ast.parse(action, mode="eval").body
    except SyntaxError as err:
        raise ParseError(f"action can't parse: {action}") from err
    if not isinstance(call, ast.Call):
        raise ParseError(f"action can't parse: {action}")
    name = call.func.id if isinstance(call.func, ast.Name) else call.func.attr if isinstance(
        call.func, ast.Attribute) else None
    return name, {kw.arg: kw.value.value if isinstance(kw.value, ast.Constant) else None for kw in call.keywords}


def _uitars_actions(text: str) -> list[str]:
    """The call strings after the last ``Action: `` (split on ``)\\n\\n``), ``type(content=...)`` re-quoted."""
    out = []
    for action in text.split("Action: ")[-1].split(")\n\n"):
        if "type(content" in action:
            if not action.strip().endswith(")"):
                action = action.strip() + ")"
            if not re.search(r"type\(content='(.*?)'\)", action):
                raise ParseError("Pattern not found in the input string.")
            content = re.sub(r"type\(content='(.*?)'\)", lambda m: m.group(1), action)
            action = "type(content='" + re.sub(r"(?<!\\)'", r"\\'", content) + "')"
        if not action.strip().endswith(")"):
            action = action.strip() + ")"
        out.append(action)
    return out


def _box(value: str, size: tuple[int, int]) -> list[float]:
    """``'(x,y)'`` absolute in the resized image -> ``[x/w, y/h, x/w, y/h]`` (4 numbers kept as given)."""
    h, w = size
    nums = [float(n) for n in value.replace("(", "").replace(")", "").split(",")]
    rel = [n / (h if (i + 1) % 2 == 0 else w) for i, n in enumerate(nums)]
    return rel + rel if len(rel) == 2 else rel


def parse_uitars(text: str, width: int, height: int) -> list[dict[str, Any]]:
    """``parse_action_to_structure_output(model_type="qwen25vl")``: ``[{action_type, action_inputs}]``."""
    text = re.sub(r"<point>(\d+)\s+(\d+)</point>", lambda m: f"({m.group(1)},{m.group(2)})",
                  re.sub(r"\[EOS\]", "", text.strip())).strip() if "<point>" in text else text.strip()
    text = text.replace("start_point=", "start_box=").replace("end_point=", "end_box=").replace("point=", "start_box=")
    size = smart_resize_uitars(height, width)
    if "Action:" not in text:
        return []
    actions = []
    for action in _uitars_actions(text):
        name, params = _call(action.replace("\n", "\\n").lstrip())
        inputs: dict[str, Any] = {}
        for key, value in params.items():
            if value == "":
                continue
            if not isinstance(value, str):
                raise ParseError(f"non-string argument {key}={value!r}")  # the authors' ``param.lstrip()`` fails
            value = value.lstrip()
            inputs[key.strip()] = str(_box(value, size)) if "start_box" in key or "end_box" in key else value
        actions.append({"action_type": name, "action_inputs": inputs})
    return actions


def _point(value: Any) -> tuple[float, float] | None:
    if isinstance(value, str):
        try:
            nums = [float(x.strip()) for x in value.strip("[]").split(",")]
        except ValueError:
            return None
        return (nums[0], nums[1]) if len(nums) >= 2 else None
    return (value[0], value[1]) if isinstance(value, list) and len(value) >= 2 else None


def uitars_to_actions(parsed: list[dict[str, Any]]) -> list[Action]:
    """``convert_ui_tars_to_agentnetbench_actions``: the first parsed UI-TARS action in AgentNetBench terms."""
    if not parsed:
        return []
    kind, inputs = parsed[0].get("action_type", ""), parsed[0].get("action_inputs", {})
    point = _point(inputs.get("point", inputs.get("start_box", [])))
    simple = {"click": "click", "left_double": "doubleclick", "right_single": "rightclick", "long_press": "click"}
    if kind in simple:
        return [(simple[kind], point)] if point else []
    if kind == "drag":
        start = _point(inputs.get("start_box", inputs.get("start_point", [])))
        end = _point(inputs.get("end_box", inputs.get("end_point", [])))
        return [("dragto", end)] if start and end else []
    if kind == "hotkey":
        keys = inputs.get("key", inputs.get("keys", ""))
        if isinstance(keys, str) and keys:
            return [("hotkey", [k.replace("ctrl", "control") for k in keys.lower().split()])]
        return [("hotkey", keys)] if isinstance(keys, list) and keys else []
    if kind == "type":
        content = inputs.get("content", "")
        if not content:
            return []
        return [("write", content[:-1]), ("press", ["enter"])] if content.endswith("\n") else [("write", content)]
    if kind == "scroll":
        direction = inputs.get("direction", "")
        return [("scroll", 5 if direction in ("up", "right") else -5)] if point and direction else []
    if kind == "press_back":
        return [("press", ["escape"])]
    if kind == "finished":
        content = inputs.get("content", "")
        return [("terminate", "success" if content and "success" in content.lower() else "failure")]
    return []


# ---------------------------------------------------------------- OpenCUA
def opencua_lines(response: str) -> str:
    """``parse_response_actions_opencua``: the stripped lines starting with ``pyautogui.`` or ``computer.``."""
    return "\n".join(line.strip() for line in response.split("\n")
                     if line.strip().startswith(("pyautogui.", "computer.")))


def _keys(keys: list[str]) -> list[str]:
    return ["ctrl" if k.strip().lower() in ("cmd", "command") else k.strip() for k in keys]


def _opencua_line(line: str, size: tuple[int, int]) -> list[Action]:
    """The actions one ``pyautogui.`` line yields (``extract_actions``' checks, in its order)."""
    h, w = size
    out: list[Action] = []
    coord = re.search(r"x=([\d.]+),\s*y=([\d.]+)", line)
    if coord:
        xy = (float(coord.group(1)) / w, float(coord.group(2)) / h)
        if "click" in line and "doubleClick" not in line and "rightClick" not in line:
            out.append(("click", xy))
        else:
            kind = next((k for k in ("moveTo", "doubleClick", "rightClick", "dragTo") if k in line), None)
            out += [(kind, xy)] if kind else []
    message = re.search(r"message=['\"](.+?)['\"]", line)
    positional = None if message else re.search(r"pyautogui\.write\((['\"])(.*?)\1\)", line)
    out += [("write", message.group(1))] if message else [("write", positional.group(2))] if positional else []
    keys = re.findall(r"keys=\[(.*?)\]", line)
    if keys:
        found = [a or b for a, b in re.findall(r"['\"]([^'\"]*)['\"]|(\w+)", keys[0]) if a or b]
        out.append(("hotkey" if "hotkey" in line else "press", _keys(found)))
    if "hotkey(" in line and "keys=" not in line:
        inside = re.search(r"pyautogui\.hotkey\((.*)\)", line)
        parts = re.findall(r"['\"]([^'\"]+)['\"]", inside.group(1)) if inside else []
        out += [("hotkey", _keys(parts))] if parts else []
    if "press(" in line and "keys=" not in line:
        out += _press(line)
    scroll = re.search(r"pyautogui\.scroll\(([-\d]+)\)", line)
    return out + ([("scroll", int(scroll.group(1)))] if scroll else [])


def _press(line: str) -> list[Action]:
    inside = re.search(r"pyautogui\.press\((.*)\)", line)
    if not inside:
        return []
    arg = inside.group(1).strip()
    if arg.startswith("["):
        keys = [p.strip() for p in re.findall(r"['\"]([^'\"]+)['\"]", arg)]
    else:
        one = re.search(r"['\"]([^'\"]+)['\"]", arg)
        keys = [one.group(1).strip()] if one else []
    keys = [("ctrl" if k.lower() in ("cmd", "command") else k) for k in keys]
    return [("hotkey" if len(keys) > 1 else "press", keys)] if keys else []


def opencua_to_actions(response: str, width: int, height: int) -> list[Action]:
    """``extract_actions(parse_response_actions_opencua(response), model_type="qwen25vl")``."""
    lines = opencua_lines(response)
    if not lines:
        return []
    size = smart_resize_opencua(height, width)
    out: list[Action] = []
    for line in (raw.strip() for raw in lines.split("\n")):
        status = re.search(r"status=['\"](\w+)['\"]", line) if line.startswith("computer.terminate") else None
        triple = re.search(r"x=([\d.]+),\s*y=([\d.]+)", line) if line.startswith("computer.triple_click") else None
        if status:
            out.append(("terminate", status.group(1)))
        elif triple:
            out.append(("triple_click", (float(triple.group(1)) / size[1], float(triple.group(2)) / size[0])))
        elif line.startswith("pyautogui."):
            out += _opencua_line(line, size)
    return out


def parse_actions(output: str, action_format: str, width: int, height: int) -> list[Action]:
    """A model output as AgentNetBench actions; ``[]`` when the authors' parser fails or finds nothing."""
    try:
        if action_format == "uitars":
            return uitars_to_actions(parse_uitars(output, width, height))
        if action_format == "opencua":
            return opencua_to_actions(output, width, height)
    except (ParseError, ValueError, AttributeError, IndexError, ZeroDivisionError):
        return []
    raise ValueError(f"unknown action_format {action_format!r}; choose uitars or opencua")


# ---------------------------------------------------------------- scoring
def _click_score(xy: tuple[float, float], gt: dict[str, Any]) -> float:
    for box in (gt.get("metadata") or {}).get("bboxes", []):
        x, y, w, h = box["rel_bbox"]
        if x <= xy[0] <= x + w and y <= xy[1] <= y + h:
            return 1.0
    pos = gt["params"].get("position", {})
    dist = math.hypot(xy[0] - pos.get("x", 0), xy[1] - pos.get("y", 0))
    return 1.0 if dist <= THRESHOLD else math.exp(-120 * (dist - THRESHOLD))


def _write_score(pred: Any, gt: dict[str, Any]) -> float:
    import editdistance

    a = str(pred).lower().strip().rstrip("\n")
    b = gt["params"].get("text", gt["params"].get("content", "")).lower().strip().rstrip("\n")
    if a == b:
        return 1.0
    sim = 1.0 - editdistance.eval(a, b) / max(len(a), len(b))
    return 1.0 if sim >= 0.8 else sim / 0.8


def evaluate_action(pred: Action, gt: dict[str, Any], alternatives: list[list[dict]] | None = None) -> float:
    """``evaluate_action``: one predicted action against one ground-truth action (alternatives by type)."""
    kind = pred[0].lower() if pred else ""
    kind = "tripleclick" if kind == "triple_click" else kind
    if kind != gt["type"].lower():
        alt = next((a[0] for a in alternatives or [] if a and a[0]["type"].lower() == kind), None)
        return evaluate_action(pred, alt, None) if alt is not None else 0.0
    if kind == "scroll":
        return 1.0  # type match only (the authors check no argument)
    if len(pred) < 2:
        return 0.0
    if kind in CLICKS:
        ok = isinstance(pred[1], tuple) and len(pred[1]) == 2
        return _click_score(pred[1], gt) if ok else 0.0
    if kind == "write":
        return _write_score(pred[1], gt)
    if kind in ("press", "hotkey"):
        keys = gt["params"].get("keys", [])
        ok = isinstance(pred[1], list) and isinstance(keys, list)
        return float(ok and {k.lower() for k in pred[1]} == {k.lower() for k in keys})
    if kind == "terminate":
        return float(pred[1] == gt["params"].get("status", ""))
    return 0.0


def step_score(predicted: list[Action], gt_actions: list[dict], alternatives: list[list[dict]]) -> tuple[float, bool]:
    """The main loop's step score and whether an alternative gave it (first predicted vs first ground truth)."""
    if not predicted or not gt_actions:
        return 0.0, False
    score = evaluate_action(predicted[0], gt_actions[0], alternatives)
    used = False
    if score == 0 and alternatives:
        for alt in alternatives:
            if alt and (s := evaluate_action(predicted[0], alt[0], None)) > score:
                score, used = s, True
    return score, used


@metric("agentnet_step")
def agentnet_step(prediction: str, reference: str, action_format: str = "uitars",
                  image_size: tuple[int, int] | list[int] = (1920, 1080), **_: Any) -> float:
    """AgentNetBench step score in [0, 1]; ``reference`` is the step's JSON ``{ground_truth_actions,
    alternative_options}``, ``image_size`` the screenshot's (width, height)."""
    gt = json.loads(reference)
    actions = parse_actions(prediction, action_format, int(image_size[0]), int(image_size[1]))
    return step_score(actions, gt["ground_truth_actions"], gt.get("alternative_options") or [])[0]

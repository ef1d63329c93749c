"""``task=synth_gui``: episodes of mostly identical GUI screenshots made of labelled widgets, for the embedded VLM.

A screen is a ``grid x grid`` array of widgets, one widget per 28 x 28 pixel cell = one merged vision token of a
Qwen2-VL-family model (patch 14, 2 x 2 merge). Every widget is drawn in the pixel code that
``kvbench-tiny-vl``'s vision tower reads (:func:`draw_widget`): its **label** lights one 2 x 2 sub-block of the
cell's top-left patch, its **value** one sub-block of the bottom-left patch, and a **changed** marker (the widget
differs from the previous screen, as GUIs highlight updates) the first sub-block of the top-right patch.

An episode has ``n_screens`` screenshots of the same widgets (labels shuffled over the grid per episode); from one
screen to the next exactly one widget changes value (and is marked), so consecutive screenshots are mostly identical
(GUI-KV's temporal redundancy). Two questions per episode, whose last word is what the model matches:

* ``current``: ``<instruction> now value of <label>`` -> the widget's value on the **last** screen (half of the
  time a widget that changed during the episode, whose older screenshots show a stale value);
* ``changed``: ``<instruction> now value of changed`` -> the value of the widget that changed on the last screen.

Answers are ``is <value>``: the first word comes from the prompt's last position, the value from the first decoding
step, which reads the (compressed) cache; the model then emits ``.`` (the stop string).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from kvbench.errors import UsageError
from kvbench.tasks.base import IMAGE, Question, Sample

CELL = 28  # pixels per widget = one merged token (patch 14, merge 2)
PATCH = 14
SUB = 2  # a code lights one SUB x SUB sub-block of a patch: 7 x 7 = 49 positions
POSITIONS = (PATCH // SUB) ** 2


def _words(text: str) -> list[str]:
    return text.split()


LABELS = _words(
    "file edit view help save open close print copy paste cut undo redo find replace zoom home back next prev menu "
    "tools search share send reply delete rename move sort filter refresh settings profile logout login upload "
    "download export import insert format table chart image link comment review mail"
)
VALUES = _words("on off red green blue gray low high lit dim left right up down full empty")
LETTERS = ["A", "B", "C", "D"]  # synth_video's answers (codes 16-19 of the value table)
COLOURS = ["red", "green", "blue", "yellow"]  # the colours those letters stand for in synth_video's options
WORDS = _words("is screen value of now changed video frame which colour that flashed options answer : ? . , "
                "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16")
#: Words of the task instruction that follows the last screenshot (as a GUI agent's prompt follows its screenshot).
INSTRUCTION_WORDS = _words(
    "please look at this panel and tell me what the dashboard shows after its latest update to our window while "
    "user waits for result in app form list bar tab page"
)
CHANGED_CODE = len(LABELS)  # the key code of the changed marker (after the 49 labels)
assert len(LABELS) == POSITIONS and len(VALUES) + len(LETTERS) <= POSITIONS


def draw_widget(img: np.ndarray, row: int, col: int, label: int, value: int, changed: bool) -> None:
    """Draw one widget into ``img`` (``uint8 [H, W, 3]``, black background) at grid cell (row, col)."""
    y0, x0 = row * CELL, col * CELL

    def light(dy: int, dx: int, code: int) -> None:
        y, x = y0 + dy + SUB * (code // (PATCH // SUB)), x0 + dx + SUB * (code % (PATCH // SUB))
        img[y: y + SUB, x: x + SUB] = 255

    light(0, 0, label)
    light(PATCH, 0, value)
    if changed:
        light(0, PATCH, 0)


def render(labels: list[list[int]], values: list[list[int]], changed: set[tuple[int, int]]) -> Any:
    """A screen (``PIL.Image``) of a grid of widgets."""
    from PIL import Image

    grid = len(labels)
    img = np.zeros((grid * CELL, grid * CELL, 3), np.uint8)
    for r in range(grid):
        for c in range(grid):
            draw_widget(img, r, c, labels[r][c], values[r][c], (r, c) in changed)
    return Image.fromarray(img)


def episode(rng: random.Random, grid: int, n_screens: int) -> dict[str, Any]:
    """Labels, per-screen values and the changed cell of each screen (None for the first)."""
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    order = rng.sample(range(len(LABELS)), grid * grid)
    labels = [[order[r * grid + c] for c in range(grid)] for r in range(grid)]
    values = [[rng.randrange(len(VALUES)) for _ in range(grid)] for _ in range(grid)]
    screens, changes = [[row[:] for row in values]], [None]
    for _ in range(1, n_screens):
        r, c = rng.choice(cells)
        values[r][c] = rng.choice([v for v in range(len(VALUES)) if v != values[r][c]])
        screens.append([row[:] for row in values])
        changes.append((r, c))
    return {"labels": labels, "screens": screens, "changes": changes}


def instruction(rng: random.Random, n_words: int) -> str:
    """``n_words`` instruction words (drawn per episode) ending with ``.``; empty for 0."""
    return " ".join(rng.choice(INSTRUCTION_WORDS) for _ in range(n_words)) + " . " if n_words else ""


def make_samples(n_samples: int = 16, n_screens: int = 8, grid: int = 7, instruction_words: int = 48, seed: int = 0,
                 limit: int | None = None) -> list[Sample]:
    """``n_samples`` episodes, each with a ``current`` and a ``changed`` question (deterministic from ``seed``); each
    question starts with the episode's ``instruction_words``-word task instruction, so the screenshots are not the
    most recent tokens of the prompt."""
    if n_screens < 2:
        raise UsageError(f"task.loader.n_screens must be >= 2 (a change needs a previous screen), got {n_screens}")
    out = []
    for i in range(n_samples if limit is None else min(n_samples, limit)):
        rng = random.Random(f"synth_gui/{seed}/{i}")
        ep = episode(rng, grid, n_screens)
        images = [render(ep["labels"], v, {ch} if ch else set()) for v, ch in zip(ep["screens"], ep["changes"],
                                                                                   strict=True)]
        context = "".join(f"screen {k + 1} : {IMAGE}\n" for k in range(n_screens))
        last, (cr, cc) = ep["screens"][-1], ep["changes"][-1]
        moved = sorted({ch for ch in ep["changes"][1:-1] if ch and ch != (cr, cc)})
        r, c = rng.choice(moved) if moved and rng.random() < 0.5 else (rng.randrange(grid), rng.randrange(grid))
        stale = any(s[r][c] != last[r][c] for s in ep["screens"][:-1])
        task = instruction(rng, instruction_words)
        questions = [
            Question("current", f"{task}now value of {LABELS[ep['labels'][r][c]]}", [f"is {VALUES[last[r][c]]}"],
                     {"category": "current", "stale_in_history": stale}),
            Question("changed", f"{task}now value of changed", [f"is {VALUES[last[cr][cc]]}"],
                     {"category": "changed"}),
        ]
        out.append(Sample(id=f"gui-{seed}-{i}", context=context, questions=questions, images=images,
                          meta={"n_screens": n_screens, "grid": grid, "seed": seed}))
    return out

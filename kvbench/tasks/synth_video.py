"""``task=synth_video``: short videos with one planted event and a multiple-choice question, for the embedded VLM.

Every frame is a ``grid x grid`` board of cells drawn in :mod:`kvbench.tasks.synth_gui`'s widget code: each cell has
a label and a colour (one of red / green / blue / yellow, value codes 16-19 of ``kvbench-tiny-vl``), and colours
drift from one frame pair to the next. The **event**: in one pair of consecutive frames (one temporal patch of
Qwen2-VL's video tokens) one cell flashes (its marker lit). The question lists the four colours as options in a
fixed order and ends with ``flashed``; the answer is ``is <letter>``, the flashing cell's colour.
"""

from __future__ import annotations

import random

from kvbench.errors import UsageError
from kvbench.tasks.base import VIDEO, Question, Sample
from kvbench.tasks.synth_gui import COLOURS, LABELS, LETTERS, VALUES, render

COLOUR_CODE = len(VALUES)  # colour i is drawn with value code 16 + i


def make_samples(n_samples: int = 16, n_frames: int = 32, grid: int = 4, seed: int = 0,
                 limit: int | None = None) -> list[Sample]:
    """``n_samples`` videos (deterministic from ``seed``), each with one question about its event."""
    if n_frames < 2 or n_frames % 2:
        raise UsageError(f"task.loader.n_frames must be even and >= 2 (Qwen2-VL merges frame pairs), got {n_frames}")
    options = " ".join(f"{letter} {colour}" for letter, colour in zip(LETTERS, COLOURS, strict=True))
    out = []
    for i in range(n_samples if limit is None else min(n_samples, limit)):
        rng = random.Random(f"synth_video/{seed}/{i}")
        order = rng.sample(range(len(LABELS)), grid * grid)
        labels = [[order[r * grid + c] for c in range(grid)] for r in range(grid)]
        colours = [[rng.randrange(4) for _ in range(grid)] for _ in range(grid)]
        event_pair, cell = rng.randrange(n_frames // 2), (rng.randrange(grid), rng.randrange(grid))
        frames, answer = [], None
        for f in range(n_frames):
            if f % 2 == 0 and f:  # colours drift between frame pairs
                r, c = rng.randrange(grid), rng.randrange(grid)
                colours[r][c] = rng.randrange(4)
            flashing = {cell} if f // 2 == event_pair else set()
            if flashing:
                answer = LETTERS[colours[cell[0]][cell[1]]]
            frames.append(render(labels, [[COLOUR_CODE + v for v in row] for row in colours], flashing))
        q = Question("event", f"options : {options} . answer colour that flashed", [f"is {answer}"],
                     {"category": "event", "event_frame": 2 * event_pair})
        out.append(Sample(id=f"video-{seed}-{i}", context=f"video : {VIDEO}\n", questions=[q], frames=frames,
                          meta={"n_frames": n_frames, "grid": grid, "seed": seed}))
    return out

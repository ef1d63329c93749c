"""Video-MME multiple choice: the official answer-letter extraction (thanku-all/parse_answer
``eval_your_results.py`` @ afd52cf, linked from BradyFU/Video-MME's README).

``extract_characters_regex``: strip, delete the answer prefixes (the official list has two missing commas, so
``"The best option isThe correct option is"`` and ``"Best answer:Best option:"`` are single prefixes: reproduced),
return "" when more than 10 words remain and none of A-D occurs, else the first of ``A B C D`` anywhere (so a
capital "A" article counts, as officially). The official accuracy divides by the *answered* questions (extraction
not empty); :func:`kvbench.tasks.videomme.official_scores` reports it next to the plain mean.
"""

from __future__ import annotations

import re
from typing import Any

from kvbench.metrics import metric

ANSWER_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is" "The correct option is",  # noqa: ISC001 - the official list's missing comma
    "Best answer:" "Best option:",  # noqa: ISC001 - likewise
    "Answer:",
    "Option:",
    "The correct answer",
    "The correct option",
)


def extract_letter(response: str) -> str:
    """The official extraction: one of ``A B C D`` or "" (not answered)."""
    s = response.strip()
    for prefix in ANSWER_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    match = re.search(r"[ABCD]", s)
    return match[0] if match else ""


@metric("videomme_mc")
def videomme_mc(prediction: str, reference: str, **_: Any) -> float:
    """1 if the extracted letter is the answer letter (an unanswered response scores 0 here)."""
    return float(extract_letter(prediction) == reference.strip())

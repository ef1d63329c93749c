"""RULER's metrics (NVIDIA/RULER ``scripts/eval/synthetic/constants.py``, unchanged since 2024-04).

Per prediction, after RULER's post-processing (``strip``, every ``[\\x00-\\x1f]`` character replaced by ``"\\n"``,
``strip`` again; ``scripts/eval/evaluate.py``):

* ``string_match_all``: the fraction of the gold strings that occur in the prediction (case-insensitive substring
  test); used by the NIAH, variable-tracking, common- and frequent-word tasks.
* ``string_match_part``: 1 if any gold string occurs in it; used by qa_1 / qa_2.

RULER averages these over a task's predictions and reports ``round(100 * mean, 2)``; kvbench reports the unrounded
``100 * mean`` over questions. Both take *all* references of a question at once (``all_references``).
Substring matching is RULER's own semantics, false positives included (``"12345678"`` matches ``"1234567"``).
"""

from __future__ import annotations

import re
from typing import Any

from kvbench.metrics import metric

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """RULER's prediction clean-up before scoring."""
    return _CONTROL.sub("\n", prediction.strip()).strip()


@metric("string_match_all", all_references=True)
def string_match_all(prediction: str, references: list[str], **_: Any) -> float:
    """Fraction of the references contained in the prediction (case-insensitive)."""
    pred = postprocess(prediction).lower()
    return sum(r.lower() in pred for r in references) / len(references)


@metric("string_match_part", all_references=True)
def string_match_part(prediction: str, references: list[str], **_: Any) -> float:
    """1 if any reference is contained in the prediction (case-insensitive)."""
    pred = postprocess(prediction).lower()
    return float(max(r.lower() in pred for r in references))

"""Long-conversation QA metrics as EpiCache scores LoCoMo, REALTALK and LongMemEval (apple/ml-epicache
``utils/metric.py``, ``f1_score`` called by ``run_baseline.py`` / ``run_epicache_eval.py`` for every dataset).

``conv_f1``: SQuAD-style token F1 after EpiCache's normalisation: lower-case, drop punctuation, drop articles,
squeeze whitespace, then the number words ``zero`` ... ``nine`` become digits. The same plain F1 for every category;
categories are reported separately by the runner (``Question.meta["category"]``). EpiCache's ``locomo_score``
(per-category rules, adversarial "no information" scoring) is not used by its evaluation scripts and is not
reproduced. Compared with EpiCache's ``f1_score`` on 3,000 random pairs: equal.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from kvbench.metrics import metric, normalize_answer

_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGITS = {w: str(i) for i, w in enumerate(_WORDS)}
_NUMBER_WORDS = re.compile(r"\b(" + "|".join(_DIGITS) + r")\b")


def normalize_conv_answer(text: str) -> str:
    """EpiCache's ``normalize_answer``: SQuAD normalisation, then number words to digits."""
    return _NUMBER_WORDS.sub(lambda m: _DIGITS[m.group()], normalize_answer(text))


@metric("conv_f1")
def conv_f1(prediction: str, reference: str, **_: Any) -> float:
    """Token F1 between the normalised prediction and reference."""
    pred, ref = normalize_conv_answer(prediction).split(), normalize_conv_answer(str(reference)).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)

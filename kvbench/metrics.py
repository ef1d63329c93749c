"""Metric registry: ``METRICS[name](prediction, reference) -> float in [0, 1]``; a sample scores its best reference.

Official benchmark metrics (LongBench, RULER, NeedleBench) register here under their official names.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable

from kvbench.errors import UsageError

METRICS: dict[str, Callable[[str, str], float]] = {}


def metric(name: str) -> Callable[[Callable[[str, str], float]], Callable[[str, str], float]]:
    """Register a metric under ``name``."""

    def wrap(fn: Callable[[str, str], float]) -> Callable[[str, str], float]:
        METRICS[name] = fn
        return fn

    return wrap


def get_metric(name: str) -> Callable[[str, str], float]:
    if name not in METRICS:
        close = difflib.get_close_matches(name, METRICS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown metric {name!r}; available: {', '.join(sorted(METRICS))}.{hint}")
    return METRICS[name]


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@metric("exact_match")
def exact_match(prediction: str, reference: str) -> float:
    """1 if the whitespace-normalised, case-folded strings are equal."""
    return float(" ".join(prediction.lower().split()) == " ".join(reference.lower().split()))


@metric("contains")
def contains(prediction: str, reference: str) -> float:
    """1 if the reference occurs in the prediction (case-insensitive), as RULER's string match."""
    return float(reference.lower() in prediction.lower())


@metric("qa_f1")
def qa_f1(prediction: str, reference: str) -> float:
    """Token F1 after SQuAD normalisation."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_prediction(prediction: str, references: list[str], names: list[str]) -> dict[str, float]:
    """Every metric in ``names``, each the max over the references."""
    return {name: max(get_metric(name)(prediction, ref) for ref in references) for name in names}

"""Metric registry: ``METRICS[name](prediction, reference, **kwargs) -> float in [0, 1]``.

A question scores the best of its references (``score_prediction``), except for metrics registered with
``all_references=True`` (RULER's ``string_match_all``), which get the whole list ``references`` at once.
Keyword arguments carry per-question extras that some official metrics need (LongBench's ``all_classes=``); a
metric ignores the ones it does not use.
Official benchmark metrics register under their official names from the submodules of this package
(``kvbench/metrics/<benchmark>.py``), which are imported automatically: adding one edits nothing else.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import re
import string
from collections import Counter
from collections.abc import Callable
from typing import Any

from kvbench.errors import UsageError

Metric = Callable[..., float]
METRICS: dict[str, Metric] = {}
ALL_REFERENCES: set[str] = set()  # metrics called once with the list of all references


def metric(name: str, all_references: bool = False) -> Callable[[Metric], Metric]:
    """Register a metric under ``name``; ``all_references``: it takes ``(prediction, references: list[str])``."""

    def wrap(fn: Metric) -> Metric:
        if name in METRICS and METRICS[name] is not fn:
            raise ValueError(f"metric {name!r} is registered twice")
        METRICS[name] = fn
        if all_references:
            ALL_REFERENCES.add(name)
        return fn

    return wrap


def get_metric(name: str) -> Metric:
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
def exact_match(prediction: str, reference: str, **_: Any) -> float:
    """1 if the whitespace-normalised, case-folded strings are equal."""
    return float(" ".join(prediction.lower().split()) == " ".join(reference.lower().split()))


@metric("contains")
def contains(prediction: str, reference: str, **_: Any) -> float:
    """1 if the reference occurs in the prediction (case-insensitive), as RULER's string match."""
    return float(reference.lower() in prediction.lower())


@metric("qa_f1")
def qa_f1(prediction: str, reference: str, **_: Any) -> float:
    """Token F1 after SQuAD normalisation."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score_prediction(prediction: str, references: list[str], names: list[str], **kwargs: Any) -> dict[str, float]:
    """Every metric in ``names``, each the max over the references (or on all of them, for ``all_references``
    metrics); ``kwargs`` go to every metric."""
    scores = {}
    for name in names:
        fn = get_metric(name)
        if name in ALL_REFERENCES:
            scores[name] = float(fn(prediction, list(references), **kwargs))
        else:
            scores[name] = max(fn(prediction, ref, **kwargs) for ref in references)
    return scores


def _import_submodules() -> None:
    """Import every ``kvbench.metrics.<module>`` so its ``@metric`` registrations happen."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_import_submodules()

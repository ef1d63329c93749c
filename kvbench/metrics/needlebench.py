"""Needle-test metrics: NeedleBench v2 (OpenCompass) as it scores, and the needle scores KV-compression papers use.

NeedleBench v2 (open-compass/opencompass ``opencompass/datasets/needlebench_v2/``):

* ``needlebench_origin`` (single-needle retrieval, ``NeedleBenchOriginEvaluator``): 1 if the needle's keyword
  occurs in the raw prediction (case-sensitive substring), else 0. The reference is the keyword.
* ``needlebench_parallel`` (multi-needle retrieval, ``NeedleBenchParallelEvaluator``): each keyword found adds
  ``100 / n_predictions`` to its depth's bucket and the result is the mean over depths, i.e. the fraction of a
  prediction's keywords found, averaged. References are the keywords (``all_references``).
* ``needlebench_atc`` (multi-needle reasoning, ``needlebench_atc_postprocess_v2`` + ``NeedleBenchATCEvaluator``):
  the content of the last ``\\boxed{...}`` of the prediction, cleaned as ``clean_atc_answer`` (``\\text{}`` /
  ``\\boxed{}`` unwrapped, backslashes, quotes and extra spaces removed, ``~`` -> space), must equal the eldest
  name exactly (after ``strip``); no box -> ``"None"`` -> 0.

KV-compression papers (KVCache-Factory / PyramidKV ``run_needle_in_haystack.py``; not NeedleBench's scores, named
as such):

* ``needle_rouge1``: Google ``rouge-score`` ROUGE-1 F-measure (Porter stemmer) of the response against the needle
  sentence. KVCache-Factory stores ``10 x`` this value; kvbench reports ``100 x`` like every metric.
  The needle is ``metric_kwargs["needle"]`` when given (the references may be a keyword), else the reference.
* ``needle_word_recall``: KVCache-Factory's heatmap score (``scripts_needle/visualize.py``, after the 2024-07-03
  fix): ``|set(response.lower().split()) & set(expected.lower().split())| / |set(expected)|`` with
  ``expected`` = ``metric_kwargs["needle_answer"]`` (default: the reference).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from kvbench.metrics import metric


@metric("needlebench_origin")
def needlebench_origin(prediction: str, reference: str, **_: Any) -> float:
    """1 if the keyword is a (case-sensitive) substring of the raw prediction."""
    return float(reference in prediction)


@metric("needlebench_parallel", all_references=True)
def needlebench_parallel(prediction: str, references: list[str], **_: Any) -> float:
    """Fraction of the keywords (one per needle/depth) found in the raw prediction, case-sensitive."""
    return sum(k in prediction for k in references) / len(references)


def last_boxed(text: str) -> str | None:
    """OpenCompass's ``extract_boxed_answer(text, strip_double_curly_brace=True)``: the last ``\\boxed`` (else
    ``\\fbox``) with its balanced braces, which must read ``\\boxed{...}``; one outer pair of braces stripped."""
    idx = text.rfind("\\boxed")
    if idx < 0:
        idx = text.rfind("\\fbox")
        if idx < 0:
            return None
    depth, close = 0, None
    for i in range(idx, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if text[i] == "}" and depth == 0:
            close = i
            break
    if close is None:
        return None
    boxed = text[idx : close + 1]
    if not boxed.startswith("\\boxed{") or not boxed.endswith("}"):
        return None
    answer = boxed[len("\\boxed{") : -1]
    match = re.match(r"^\{(.*)\}$", answer)
    return match.group(1) if match else answer


def clean_atc_answer(text: str) -> str:
    """OpenCompass's ``clean_atc_answer``: unwrap LaTeX, drop backslashes and quotes, squeeze spaces."""
    if not text or text == "None":
        return "None"
    text = re.sub(r"\\text\{([^}]+)\}", r"\1", text)
    text = re.sub(r"\\boxed\{([^}]+)\}", r"\1", text)
    text = re.sub(r"\\[\[\]]", "", text)
    text = text.replace("\\\\", "").replace("\\", "")
    text = re.sub(r"\s+", " ", text).strip()
    text = text.replace('"', "").replace("'", "")
    return text.replace("~", " ")


def atc_postprocess(prediction: str) -> str:
    """The boxed answer of a prediction, cleaned; ``"None"`` without a box."""
    boxed = last_boxed(prediction)
    return clean_atc_answer(boxed) if boxed else "None"


@metric("needlebench_atc")
def needlebench_atc(prediction: str, reference: str, **_: Any) -> float:
    """1 if the cleaned boxed answer equals the eldest ancestor's name exactly."""
    return float(atc_postprocess(prediction).strip() == reference.strip())


@cache
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


@metric("needle_rouge1")
def needle_rouge1(prediction: str, reference: str, needle: str | None = None, **_: Any) -> float:
    """ROUGE-1 F1 (rouge-score, stemmed) of the prediction against the needle sentence, in [0, 1]."""
    return float(_rouge().score(needle or reference, prediction)["rouge1"].fmeasure)


@metric("needle_word_recall")
def needle_word_recall(prediction: str, reference: str, needle_answer: str | None = None, **_: Any) -> float:
    """Unique-word recall of the expected answer in the lower-cased, whitespace-split prediction."""
    expected = set((needle_answer or reference).lower().split())
    return len(set(prediction.lower().split()) & expected) / len(expected) if expected else 0.0

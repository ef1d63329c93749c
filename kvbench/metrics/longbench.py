"""LongBench's official metrics (THUDM/LongBench ``LongBench/metrics.py`` @ 2e00731), quirks included.

Registered under the official names with the official call form ``metric(prediction, ground_truth, **kwargs)``
(one reference; the max over references is taken by the caller, as ``eval.py`` does). Written from the official
semantics with the packages the official script uses (``rouge`` 1.0.1, ``jieba`` 0.42.1, ``fuzzywuzzy`` 0.18.0):

* ``qa_f1_score``: SQuAD normalisation (lower, drop ASCII punctuation, then articles, squeeze whitespace), bag-of-
  tokens F1; an empty normalised answer scores 0 (SQuAD would give 1 to two empty answers).
* ``qa_f1_zh_score``: jieba tokens (precise mode), each stripped of ASCII + a fixed set of CJK punctuation (it has
  the closing ``》`` but not the opening ``《``) and whitespace, empty tokens dropped, then the same F1.
* ``rouge_score``: ``Rouge().get_scores([pred], [gt], avg=True)["rouge-l"]["f"]``; *any* exception scores 0.0,
  including the package's ``RecursionError`` on a long sentence without ``"."``. The recursion limit is set so the
  failure happens at the same length as under the official ``eval.py`` (whatever the caller's stack depth).
* ``rouge_zh_score``: ``rouge_score`` over space-joined jieba tokens.
* ``classification_score`` (needs ``all_classes=``): classes occurring in the prediction, minus those that are
  substrings of the gold label, removed *while iterating* (so the element after a removed one survives); then
  ``1/len(matches)`` if the gold label is among them.
* ``retrieval_score`` / ``retrieval_zh_score``: the gold id is the first ``Paragraph (\\d+)`` / ``段落(\\d+)`` of the
  reference; the score is the share of the prediction's digit runs equal to it (string comparison).
* ``count_score``: the share of the prediction's digit runs equal to ``str(ground_truth)``.
* ``code_sim_score``: the first line of ``prediction.lstrip("\\n")`` with no `````, ``#`` or ``//`` (not stripped;
  ``""`` if none), then ``fuzz.ratio(line, gt) / 100``. fuzzywuzzy uses python-Levenshtein when it is installed and
  ``difflib`` otherwise (LongBench's requirements: difflib); :func:`fuzzy_backend` names the one in use and runs
  record it.
"""

from __future__ import annotations

import re
import string
import sys
import warnings
from collections import Counter
from typing import Any

import jieba
from rouge import Rouge

from kvbench.metrics import metric, normalize_answer

with warnings.catch_warnings():  # "Using slow pure-python SequenceMatcher": the official default, recorded instead
    warnings.simplefilter("ignore")
    from fuzzywuzzy import fuzz

jieba.setLogLevel(60)  # jieba prints its dictionary-loading banner on stderr otherwise

#: ASCII punctuation plus the CJK/full-width set of the official ``normalize_zh_answer`` (no opening 《).
ZH_PUNCTUATION = frozenset(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】"
    + "〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
#: Recursion headroom (calls still possible) inside the official ``rouge_score`` frame under ``python eval.py``
#: (<module> -> scorer -> rouge_score), measured on CPython 3.11 with the default limit of 1000.
OFFICIAL_ROUGE_HEADROOM = 996


def fuzzy_backend() -> str:
    """The ``SequenceMatcher`` behind ``fuzz.ratio``: ``python-Levenshtein`` or ``difflib`` (the official default)."""
    return "python-Levenshtein" if "StringMatcher" in fuzz.SequenceMatcher.__module__ else "difflib"


def _f1(pred: list[str], ref: list[str]) -> float:
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def normalize_zh_answer(text: str) -> str:
    """Lower-case, drop :data:`ZH_PUNCTUATION`, drop all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in ZH_PUNCTUATION).split())


@metric("qa_f1_score")
def qa_f1_score(prediction: str, ground_truth: str, **_: Any) -> float:
    return _f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


@metric("qa_f1_zh_score")
def qa_f1_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    def tokens(text: str) -> list[str]:
        return [t for t in (normalize_zh_answer(w) for w in jieba.cut(text, cut_all=False)) if t]

    return _f1(tokens(prediction), tokens(ground_truth))


def _headroom(n: int = 0) -> int:
    """How many more nested Python calls fit under the recursion limit from the caller's frame."""
    try:
        return _headroom(n + 1)
    except RecursionError:
        return n


def _rouge_l(prediction: str, ground_truth: str, official_headroom: int) -> float:
    """ROUGE-L F of the ``rouge`` package, 0.0 on any exception, with the official recursion headroom."""
    saved = sys.getrecursionlimit()
    # the package's recursive LCS fails where the official eval.py fails, whatever this caller's stack depth
    sys.setrecursionlimit(saved + official_headroom - _headroom())
    try:
        return float(Rouge().get_scores([prediction], [ground_truth], avg=True)["rouge-l"]["f"])
    except Exception:  # the official script scores every failure (empty text, RecursionError, ...) as 0
        return 0.0
    finally:
        sys.setrecursionlimit(saved)


@metric("rouge_score")
def rouge_score(prediction: str, ground_truth: str, **_: Any) -> float:
    return _rouge_l(prediction, ground_truth, OFFICIAL_ROUGE_HEADROOM)


@metric("rouge_zh_score")
def rouge_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    pred = " ".join(jieba.cut(prediction, cut_all=False))
    ref = " ".join(jieba.cut(ground_truth, cut_all=False))
    return _rouge_l(pred, ref, OFFICIAL_ROUGE_HEADROOM - 1)  # officially one frame deeper (rouge_zh -> rouge)


@metric("classification_score")
def classification_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    all_classes = kwargs.get("all_classes")
    if all_classes is None:
        raise TypeError("classification_score needs all_classes= (the dataset's class names)")
    matches = [c for c in all_classes if c in prediction]
    for m in matches:  # removing while iterating skips the next element, exactly as the official loop does
        if m in ground_truth and m != ground_truth:
            matches.remove(m)
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _share_equal(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == target for n in numbers) / len(numbers) if numbers else 0.0


@metric("retrieval_score")
def retrieval_score(prediction: str, ground_truth: str, **_: Any) -> float:
    return _share_equal(prediction, re.findall(r"Paragraph (\d+)", ground_truth)[0])


@metric("retrieval_zh_score")
def retrieval_zh_score(prediction: str, ground_truth: str, **_: Any) -> float:
    return _share_equal(prediction, re.findall(r"段落(\d+)", ground_truth)[0])


@metric("count_score")
def count_score(prediction: str, ground_truth: str, **_: Any) -> float:
    return _share_equal(prediction, str(ground_truth))


@metric("code_sim_score")
def code_sim_score(prediction: str, ground_truth: str, **_: Any) -> float:
    lines = prediction.lstrip("\n").split("\n")
    line = next((ln for ln in lines if "`" not in ln and "#" not in ln and "//" not in ln), "")
    return fuzz.ratio(line, ground_truth) / 100

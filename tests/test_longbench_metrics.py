"""LongBench's official metrics on hand-computed cases, each quirk of the official implementation included."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from kvbench.metrics import METRICS, score_prediction
from kvbench.metrics.longbench import fuzzy_backend

OFFICIAL_NAMES = ("qa_f1_score", "qa_f1_zh_score", "rouge_score", "rouge_zh_score", "classification_score",
                  "retrieval_score", "retrieval_zh_score", "count_score", "code_sim_score")


def m(name: str):
    return METRICS[name]


def test_registered_under_the_official_names_with_the_official_call_form() -> None:
    for name in OFFICIAL_NAMES:
        assert name in METRICS
        METRICS[name]("Paragraph 1 段落1 1", "Paragraph 1 段落1", all_classes=["a"])  # (prediction, gt, **kwargs)


def test_qa_f1_normalises_like_squad_and_scores_empty_answers_zero() -> None:
    assert m("qa_f1_score")("The cat sat.", "a cat") == pytest.approx(2 / 3)  # P 1/2, R 1
    assert m("qa_f1_score")("well-known", "well known") == 0.0  # punctuation removed before splitting
    assert m("qa_f1_score")("Ender's Game", "enders game") == 1.0
    assert m("qa_f1_score")("the", "a") == 0.0  # both normalise to nothing: 0, not SQuAD's 1


def test_qa_f1_zh_uses_jieba_tokens_and_the_official_punctuation_set() -> None:
    assert m("qa_f1_zh_score")("《红楼梦》", "红楼梦") == pytest.approx(2 / 3)  # opening 《 is not in the set
    assert m("qa_f1_zh_score")("上海", "上海市") == 0.0  # jieba keeps 上海市 as one word
    assert m("qa_f1_zh_score")("红楼梦。", "红楼梦") == 1.0


def test_rouge_is_summary_level_lcs_of_the_rouge_package() -> None:
    # hyp "a b c d", ref "a c e": LCS 2, unique words 4 / 3 -> P 1/2, R 2/3, F = 2PR / (P + R + 1e-8)
    expected = 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3 + 1e-8)
    assert m("rouge_score")("a b c d", "a c e") == pytest.approx(expected, abs=1e-12)
    assert m("rouge_score")("the cat sat", "the cat sat") == pytest.approx(0.999999995, abs=1e-12)
    assert m("rouge_score")("Cat", "cat") == 0.0  # case-sensitive, no stemming
    assert m("rouge_score")("the the the cat", "the cat") == pytest.approx(1.0, abs=1e-7)  # unique-word counts
    assert m("rouge_score")("", "the cat") == 0.0  # the package raises on an empty hypothesis: scored 0
    assert m("rouge_score")(".", "the cat") == 0.0


def test_rouge_recursion_failure_happens_at_the_official_length() -> None:
    """The package's recursive LCS back-trace fails on a ~1000-token sentence without "."; scored 0 like eval.py."""
    def words(n: int) -> str:
        return " ".join(f"w{i}" for i in range(n))

    assert m("rouge_score")(words(990), words(990)) == pytest.approx(1.0, abs=1e-7)
    assert m("rouge_score")(words(991), words(991)) == 0.0


@pytest.mark.slow
def test_rouge_recursion_threshold_matches_an_eval_py_shaped_script() -> None:
    # the same threshold under a script that calls the metric as the official eval.py does (module -> scorer -> f)
    script = textwrap.dedent("""
        from rouge import Rouge
        def rouge_score(p, g):
            try:
                return Rouge().get_scores([p], [g], avg=True)["rouge-l"]["f"]
            except Exception:
                return 0.0
        def scorer(n):
            t = " ".join(f"w{i}" for i in range(n))
            return rouge_score(t, t)
        print(scorer(990) > 0.99, scorer(991))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120).stdout.split()
    assert out == ["True", "0.0"]


def test_rouge_zh_joins_jieba_tokens() -> None:
    assert m("rouge_zh_score")("今天天气很好", "今天天气很好") == pytest.approx(0.999999995, abs=1e-9)
    assert m("rouge_zh_score")("", "今天天气很好") == 0.0


def test_classification_keeps_the_official_list_mutation_quirk() -> None:
    classes = ["体育彩票", "体育", "彩票"]
    # 体育 is removed while iterating, so 彩票 (right after it) is skipped and survives: 1/2, not 1
    assert m("classification_score")("体育彩票 体育 彩票", "体育彩票", all_classes=classes) == 0.5
    assert m("classification_score")("Type: Description", "Description", all_classes=["Description", "Entity"]) == 1
    assert m("classification_score")("Entity or Description", "Description",
                                     all_classes=["Description", "Entity"]) == 0.5
    assert m("classification_score")("description", "Description", all_classes=["Description"]) == 0.0
    with pytest.raises(TypeError, match="all_classes"):
        m("classification_score")("x", "Description")


def test_retrieval_and_count_divide_by_every_number_in_the_prediction() -> None:
    assert m("retrieval_score")("Paragraph 3, not Paragraph 30", "Paragraph 3") == 0.5
    assert m("retrieval_score")("Paragraph 03", "Paragraph 3") == 0.0  # string comparison
    assert m("retrieval_score")("no number", "Paragraph 3") == 0.0
    assert m("retrieval_zh_score")("答案是段落12", "段落12") == 1.0
    assert m("count_score")("12 unique paragraphs out of 1,234", 12) == pytest.approx(1 / 3)  # 12, 1, 234
    assert m("count_score")("twelve", "12") == 0.0
    with pytest.raises(IndexError):  # a reference without the pattern fails as in the official code
        m("retrieval_score")("1", "3")


def test_code_sim_picks_the_first_line_without_comment_markers() -> None:
    pred = "\n# comment\n    return a // b\n    x = 1\n"
    assert m("code_sim_score")(pred, "    x = 1") == 1.0  # the // line is skipped, indentation kept
    assert m("code_sim_score")("```python", "x = 1") == 0.0  # no line qualifies: "" scores 0
    assert m("code_sim_score")("abcd", "abce") == 0.75


@pytest.mark.skipif(fuzzy_backend() != "difflib", reason="python-Levenshtein installed")
def test_code_sim_difflib_backend_rounds_half_to_even() -> None:
    assert m("code_sim_score")("abcdefgh", "aXXXXXXX") == 0.12  # ratio 0.125 -> round(12.5) = 12


def test_score_prediction_takes_the_max_over_references_with_all_classes() -> None:
    scores = score_prediction("Entity", ["Description", "Entity"], ["classification_score"],
                              all_classes=["Description", "Entity"])
    assert scores == {"classification_score": 1.0}

"""Tests of the deterministic synthetic retrieval suite (kvbench.tasks.synthetic)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kvbench.embedded import DEFAULT_DIR
from kvbench.tasks import synthetic as syn
from kvbench.tasks import synthetic_vocab as sv
from kvbench.tasks.base import Sample


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(DEFAULT_DIR)


def _all(kind: str, seed: int = 0) -> list[Sample]:
    kw = {"n_keys": 4, "n_questions": 3} if kind == "multiquery" else {}
    return syn.make_samples(kind, 2, [512, 1024], seed=seed, depths=[0.0, 0.5, 1.0], **kw)


@pytest.mark.parametrize("kind", syn.KINDS)
def test_deterministic_by_seed(kind: str) -> None:
    assert _all(kind, seed=0) == _all(kind, seed=0)
    a, b = _all(kind, seed=0), _all(kind, seed=1)
    assert [s.context for s in a] != [s.context for s in b]
    assert all(x.context != y.context for x, y in zip(a, b, strict=True))


def test_sample_does_not_depend_on_other_cells() -> None:
    both = syn.make_samples("multikey", 3, [512, 1024], seed=5)
    alone = syn.make_samples("multikey", 3, [1024], seed=5)
    assert both[3:] == alone


@pytest.mark.parametrize("kind", syn.KINDS)
def test_lengths_and_vocabulary(kind: str, tok: PreTrainedTokenizerFast) -> None:
    vocab = set(sv.vocabulary())
    for s in _all(kind):
        ids = tok(s.context, add_special_tokens=True).input_ids
        assert ids[0] == tok.bos_token_id
        assert abs(len(ids) - s.meta["target_length"]) <= 2
        assert len(ids) == s.meta["context_tokens"]
        assert set(s.context.split()) <= vocab
        assert tok.unk_token_id not in ids
        assert s.context.endswith(".")


@pytest.mark.parametrize("kind", syn.KINDS)
def test_needles_are_unambiguous(kind: str, tok: PreTrainedTokenizerFast) -> None:
    for s in _all(kind):
        words = s.context.split()
        content = [w for w in words if w in set(sv.CONTENT_WORDS)]
        assert len(content) == len(set(content)), "a name or code occurs twice: the model could copy from elsewhere"
        for q in s.questions:
            key, answer = q.meta["key"], q.answers[0].split()
            qwords = q.text.split()
            assert qwords[-1] == key and qwords.count(key) == 1
            assert not set(qwords[:-1]) & set(sv.CONTENT_WORDS)
            assert words.count(key) == 1
            i = words.index(key)
            assert words[i + 1 : i + 2 + len(answer)] == [*answer, syn.STOP[0]]
            assert s.context.count(q.answers[0]) == 1
            ids = tok(s.context).input_ids
            assert tok.convert_ids_to_tokens(ids[q.meta["key_position"]]) == key


def test_needle_depth_grid() -> None:
    samples = syn.make_samples("needle", 1, [1024], seed=0)
    depths = [s.questions[0].meta["depth"] for s in samples]
    assert depths == syn.DEFAULT_DEPTHS
    actual = [s.questions[0].meta["actual_depth"] for s in samples]
    assert actual == sorted(actual)
    assert all(abs(a - d) < 0.05 for a, d in zip(actual, depths, strict=True))
    assert all(s.meta["n_keys"] == 1 and len(s.questions) == 1 for s in samples)


def test_multikey_and_multiquery_questions() -> None:
    for s in syn.make_samples("multikey", 4, [512], n_keys=5):
        assert len(s.meta["keys"]) == 5 and len(s.questions) == 1
    for s in syn.make_samples("multiquery", 4, [512], n_keys=4, n_questions=3):
        keys = [q.meta["key"] for q in s.questions]
        assert len(keys) == 3 == len(set(keys))
        assert len({q.id for q in s.questions}) == 3


def test_answer_len_and_errors() -> None:
    s = syn.make_samples("multikey", 1, [512], answer_len=5)[0]
    assert len(s.questions[0].answers[0].split()) == 5
    with pytest.raises(ValueError):
        syn.make_samples("nope", 1, [512])
    with pytest.raises(ValueError):
        syn.make_samples("multiquery", 1, [512], n_keys=2, n_questions=3)
    with pytest.raises(ValueError):
        syn.make_samples("multikey", 1, [512], answer_len=syn.MAX_NEW_TOKENS)


def test_suites() -> None:
    assert {"needle", "multikey", "multiquery"} <= set(syn.SUITES)
    lengths: set[int] = set()
    for name, cfg in syn.SUITES.items():
        samples = syn.load_suite(name)
        assert 1 <= len(samples) <= 48, name
        assert len({s.id for s in samples}) == len(samples)
        lengths |= set(cfg["lengths"])
    assert min(lengths) <= 512 and max(lengths) >= 2048
    assert syn.SUITES["multikey"]["n_keys"] == 4 and syn.SUITES["multikey"]["lengths"] == [1024, 2048]
    assert syn.load_suite("smoke", seed=3) != syn.load_suite("smoke")


def test_cut_at_stop() -> None:
    assert syn.cut_at_stop("k1 k2 k3 . the") == "k1 k2 k3"
    assert syn.cut_at_stop(" k1 k2") == "k1 k2"
    assert syn.STOP == ["."] and syn.MAX_NEW_TOKENS >= 4

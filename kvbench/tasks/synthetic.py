"""Deterministic synthetic retrieval tasks for the embedded kvbench-tiny model (and any model with its vocabulary).

A context is filler sentences (``the old dog sees a river .``) with *needles* inserted at sentence boundaries::

    the code of alice k17 k4 k92 .

and a question ends exactly where the answer starts, with the key as its last (and only once-present) token::

    question : what is the code of alice          ->  expected continuation "k17 k4 k92 ."

Prompt = ``tokenizer(context, add_special_tokens=True).input_ids + tokenizer(question.text,
add_special_tokens=False).input_ids``; greedy decoding for at most :data:`MAX_NEW_TOKENS` tokens, cut at the first
stop string in :data:`STOP` (the needle continues with ``.``, which the model copies), stripped, then compared with
``Question.answers``. Names and codes are unique within a sample, so the only earlier occurrence of the question's
last token is the key of its needle, and every answer piece occurs exactly once in the context.

Lengths are counted in tokens of the kvbench-tiny word-level tokenizer *including* ``<s>``; contexts hit the
target exactly (recorded in ``Sample.meta["context_tokens"]``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from kvbench.errors import UsageError
from kvbench.tasks import synthetic_vocab as sv
from kvbench.tasks.base import Question, Sample

#: Greedy generation budget; enough for answers of up to 7 codes plus the stop word.
MAX_NEW_TOKENS = 8
#: Stop strings: generation is cut at the first one (the needle continues with ".").
STOP: list[str] = ["."]
KINDS = ("needle", "multikey", "multiquery")
DEFAULT_DEPTHS: list[float] = [round(0.1 * i, 1) for i in range(11)]
MIN_SENTENCE, MAX_SENTENCE = 5, 12

#: Named default configurations: ``make_samples(**SUITES[name])``. Sample counts are per length (and per depth for
#: ``needle``); each suite runs in seconds on a CPU with kvbench-tiny.
SUITES: dict[str, dict[str, Any]] = {
    "needle": {"kind": "needle", "lengths": [512, 1024, 2048], "n_samples": 1, "depths": DEFAULT_DEPTHS},
    "multikey": {"kind": "multikey", "lengths": [1024, 2048], "n_samples": 16, "n_keys": 4},
    "multiquery": {"kind": "multiquery", "lengths": [512, 1024, 2048], "n_samples": 8, "n_keys": 4, "n_questions": 2},
    "smoke": {"kind": "multikey", "lengths": [512], "n_samples": 4, "n_keys": 4},
}


def needle_words(key: str, answer: list[str]) -> list[str]:
    """The needle sentence: ``the code of <key> <answer...> .``."""
    return ["the", "code", "of", key, *answer, "."]


def question_text(key: str) -> str:
    """The question; it ends with the key, where the answer starts."""
    return f"question : what is the code of {key}"


def cut_at_stop(text: str, stop: list[str] | None = None) -> str:
    """Generated text up to (excluding) the first stop string, stripped."""
    for s in stop if stop is not None else STOP:
        text = text.split(s, 1)[0]
    return text.strip()


def _sentence(rng: random.Random, n: int, nouns: Sequence[str] = sv.NOUNS, verbs: Sequence[str] = sv.VERBS,
              adjectives: Sequence[str] = sv.ADJECTIVES) -> list[str]:
    """A filler sentence of exactly n tokens (MIN_SENTENCE <= n <= MAX_SENTENCE + 1), ending in '.', from these
    content words (the embedded vocabulary by default; the conversation task passes a topic's)."""
    if n == MIN_SENTENCE:
        return [rng.choice(sv.DETERMINERS), rng.choice(nouns), rng.choice(verbs), rng.choice(sv.ADVERBS), "."]
    extra = n - 6
    use_pp = extra > 3 or (extra == 3 and rng.random() < 0.5)
    singles = ["adj_subj", "adj_obj", "adv"] + (["adj_pp"] if use_pp else [])
    chosen = set(rng.sample(singles, extra - 3 * use_pp))

    def noun_phrase(slot: str) -> list[str]:
        adj = [rng.choice(adjectives)] if slot in chosen else []
        return [rng.choice(sv.DETERMINERS), *adj, rng.choice(nouns)]

    words = [*noun_phrase("adj_subj"), rng.choice(verbs), *noun_phrase("adj_obj")]
    if use_pp:
        words += [rng.choice(sv.PREPOSITIONS), *noun_phrase("adj_pp")]
    if "adv" in chosen:
        words.append(rng.choice(sv.ADVERBS))
    return [*words, "."]


def _filler(rng: random.Random, n_tokens: int) -> list[list[str]]:
    """Filler sentences with exactly n_tokens tokens in total (0 or >= MIN_SENTENCE)."""
    if 0 < n_tokens < MIN_SENTENCE:
        raise UsageError(f"cannot fill {n_tokens} tokens with sentences of >= {MIN_SENTENCE} tokens")
    sentences: list[list[str]] = []
    remaining = n_tokens
    while remaining > 2 * MAX_SENTENCE:
        sentences.append(_sentence(rng, rng.randint(MIN_SENTENCE, MAX_SENTENCE)))
        remaining -= len(sentences[-1])
    if remaining > MAX_SENTENCE:
        sentences.append(_sentence(rng, remaining // 2))
        remaining -= remaining // 2
    if remaining:
        sentences.append(_sentence(rng, remaining))
    return sentences


def _insert_needles(
    sentences: list[list[str]], needles: list[list[str]], depths: list[float]
) -> tuple[list[str], list[int]]:
    """Insert each needle at the sentence boundary closest to its relative depth in the filler.

    Returns the context words and, per needle, the index of its key in the context token ids (``<s>`` is 0).
    """
    cum = [0]
    for s in sentences:
        cum.append(cum[-1] + len(s))
    at = [min(range(len(cum)), key=lambda b, d=d: (abs(cum[b] - d * cum[-1]), b)) for d in depths]
    order = sorted(range(len(needles)), key=lambda j: (at[j], depths[j], j))
    words: list[str] = []
    key_pos = [0] * len(needles)
    next_needle = 0
    for b in range(len(sentences) + 1):
        while next_needle < len(order) and at[order[next_needle]] == b:
            j = order[next_needle]
            key_pos[j] = 1 + len(words) + 3  # <s> + words so far + "the code of"
            words += needles[j]
            next_needle += 1
        if b < len(sentences):
            words += sentences[b]
    return words, key_pos


def _build_sample(
    rng: random.Random, sample_id: str, length: int, depths: list[float], n_questions: int, answer_len: int,
    meta: dict[str, Any],
) -> Sample:  # fmt: skip
    """One context of `length` tokens (incl. <s>) with len(depths) needles and n_questions questions."""
    n_keys = len(depths)
    keys = rng.sample(sv.NAMES, n_keys)
    codes = rng.sample(sv.CODES, n_keys * answer_len)
    answers = [codes[j * answer_len : (j + 1) * answer_len] for j in range(n_keys)]
    needles = [needle_words(k, a) for k, a in zip(keys, answers, strict=True)]
    n_filler = length - 1 - sum(len(n) for n in needles)
    words, key_pos = _insert_needles(_filler(rng, n_filler), needles, depths)
    asked = rng.sample(range(n_keys), n_questions)
    questions = [
        Question(
            id=f"q{qi}",
            text=question_text(keys[j]),
            answers=[" ".join(answers[j])],
            meta={
                "depth": depths[j],
                "actual_depth": round((key_pos[j] - 3) / length, 4),
                "key": keys[j],
                "needle_index": j,
                "key_position": key_pos[j],
            },
        )
        for qi, j in enumerate(asked)
    ]
    meta = {**meta, "target_length": length, "context_tokens": 1 + len(words), "n_keys": n_keys,
            "keys": keys, "needle_depths": depths, "key_positions": key_pos}  # fmt: skip
    return Sample(id=sample_id, context=" ".join(words), questions=questions, meta=meta)


def make_samples(
    kind: str, n_samples: int, lengths: list[int], seed: int = 0, n_keys: int = 4, n_questions: int = 1,
    depths: list[float] | None = None, answer_len: int = 3,
) -> list[Sample]:  # fmt: skip
    """Deterministic synthetic retrieval samples.

    Args:
        kind: ``needle`` (one needle, swept over ``depths``), ``multikey`` (``n_keys`` needles, one question about a
            random one, the others are distractors) or ``multiquery`` (``n_keys`` needles, ``n_questions`` questions
            about different needles of the same context).
        n_samples: samples per length, and for ``needle`` per (length, depth) cell.
        lengths: context lengths in tokens including ``<s>`` (met exactly).
        seed: every sample is drawn from its own ``random.Random`` seeded with (seed, kind, cell, index), so a sample
            does not depend on the other lengths/depths requested.
        n_keys: needles per context (``multikey``/``multiquery``; ``needle`` always has 1).
        n_questions: questions per context for ``multiquery`` (<= n_keys); the other kinds ask 1.
        depths: relative needle depths for ``needle`` (default 0.0, 0.1, ..., 1.0; clipped to [0, 1]); ignored
            otherwise (needle depths are uniform random there).
        answer_len: codes per answer (<= MAX_NEW_TOKENS - 1).
    """
    if kind not in KINDS:
        raise UsageError(f"unknown synthetic kind {kind!r}; expected one of {KINDS}")
    if not 1 <= answer_len < MAX_NEW_TOKENS:
        raise UsageError(f"answer_len must be in [1, {MAX_NEW_TOKENS - 1}]")
    if kind == "multiquery" and not 1 <= n_questions <= n_keys:
        raise UsageError("multiquery needs 1 <= n_questions <= n_keys")
    samples: list[Sample] = []
    for length in lengths:
        cells = [min(max(d, 0.0), 1.0) for d in (depths or DEFAULT_DEPTHS)] if kind == "needle" else [None]
        for ci, depth in enumerate(cells):
            for i in range(n_samples):
                rng = random.Random(f"kvbench-synthetic/{seed}/{kind}/{length}/{ci}/{i}")
                if depth is None:
                    needle_depths = [round(rng.random(), 4) for _ in range(n_keys)]
                    sid, nq = f"{kind}-L{length}-{i}", n_questions if kind == "multiquery" else 1
                else:
                    needle_depths, sid, nq = [depth], f"{kind}-L{length}-d{depth:.2f}-{i}", 1
                meta = {"kind": kind, "seed": seed, "index": i}
                samples.append(_build_sample(rng, sid, length, needle_depths, nq, answer_len, meta))
    return samples


def load_suite(name: str, **overrides: Any) -> list[Sample]:
    """Samples of a named suite in :data:`SUITES`, with keyword overrides (e.g. ``seed=1``)."""
    if name not in SUITES:
        raise KeyError(f"unknown synthetic suite {name!r}; known: {sorted(SUITES)}")
    return make_samples(**{**SUITES[name], **overrides})

"""Synthetic long conversations with many questions each (a LongConvQA stand-in for the embedded kvbench-tiny model).

A conversation is a list of *sessions*; each has a date and is about one *topic*, and topics recur in non-adjacent
sessions (so topic episodes are not contiguous blocks). Several speakers take turns of chit-chat in the topic's
vocabulary, and *facts* are scattered over the sessions of their topic::

    today is k403 .
    alice : the tall mountain reaches a cold river slowly .
    bob : remember the lake of oscar k17 k4 k92 .
    carol : every dark cloud follows that wide hill .
    ...

Every question asks about one fact and ends exactly where its answer starts (``question : what is the lake of
oscar`` -> ``k17 k4 k92``), so kvbench-tiny's induction head answers it by copying what followed the fact's key.
Answers are 1-3 codes (question type ``code``) or a name (type ``name``); keys, names and codes occur once per
conversation, speakers only as speakers. The four topics use disjoint nouns, adjectives and verbs (determiners,
prepositions, adverbs and the speakers are shared), so a bag-of-words embedding of a few turns (e.g. EpiCache's
``embedder: llm``, which mean-pools the model's input embeddings) separates them, and each question names its
topic's noun, so it routes to the right topic.

**Structured turns.** ``Sample.meta["turns"]`` holds the conversation the way the LongConvQA loaders (LoCoMo,
REALTALK, LongMemEval) produce it, so methods can segment it into utterance windows without parsing the context::

    [{"session": 0, "date": "k403", "speaker": "alice", "text": "the tall mountain reaches a cold river slowly ."},
     ...]

``session`` is the 0-based session index, ``date`` the session's date as written in its header, ``speaker`` and
``text`` one utterance. ``Sample.meta["turn_format"]`` is how a turn is written in the context (``"{speaker} :
{text}"``) and ``Sample.meta["session_header"]`` how a session starts (``"today is {date} ."``); the context is
those lines joined by newlines. Deviation from EpiCache's rendering (``Speaker said, "text"`` under ``DATE:``
headers): kvbench-tiny's vocabulary has no ``said``, quotes or calendar words, so speakers are written
``name :`` and a date is a day-number code (``k400`` ... ``k511``, increasing over the sessions).

What the tiny model cannot do, the task does not ask: no temporal, multi-hop, adversarial or knowledge-update
questions (a fact stated twice would give the induction head two places to copy from). Metrics: ``qa_f1`` (SQuAD
token F1, as EpiCache and LoCoMo score) and ``exact_match``. The intended protocol is ``query_agnostic``: the
conversation is compressed once and all its questions are answered over that cache.

Lengths are counted in tokens of the kvbench-tiny tokenizer including ``<s>`` and met exactly
(``Sample.meta["context_tokens"]``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from kvbench.errors import UsageError
from kvbench.tasks import synthetic
from kvbench.tasks import synthetic_vocab as sv
from kvbench.tasks.base import Question, Sample


@dataclass(frozen=True)
class Topic:
    """The content words of one topic (disjoint from every other topic's)."""

    nouns: tuple[str, ...]
    adjectives: tuple[str, ...]
    verbs: tuple[str, ...]


#: Four topics partitioning the filler nouns, adjectives and verbs of the embedded vocabulary.
TOPICS: dict[str, Topic] = {
    "outdoors": Topic(("mountain", "hill", "forest", "river", "lake", "sky", "cloud", "stone"),
                      ("cold", "tall", "wide", "dark", "blue"), ("crosses", "reaches", "follows", "finds")),
    "home": Topic(("house", "door", "window", "lamp", "table", "book", "garden"),
                  ("warm", "soft", "quiet", "small", "round"), ("paints", "holds", "touches", "likes")),
    "town": Topic(("city", "road", "bridge", "train", "market", "village", "boat"),
                  ("old", "bright", "heavy", "slow", "long"), ("passes", "meets", "leaves", "carries")),
    "farm": Topic(("horse", "dog", "cat", "bird", "field", "grass", "apple", "tree"),
                  ("green", "young", "happy", "calm", "red"), ("watches", "sees", "hears", "remembers")),
}  # fmt: skip
QUESTION_TYPES = ("code", "name")
TURN_FORMAT = "{speaker} : {text}"
SESSION_HEADER = "today is {date} ."
#: Session dates are day numbers written as these codes; answers use the other codes.
DATE_CODES: tuple[str, ...] = sv.CODES[400:]
ANSWER_CODES: tuple[str, ...] = sv.CODES[:400]
MAX_NEW_TOKENS = 8
STOP: list[str] = ["."]
MIN_SENTENCE, MAX_SENTENCE = synthetic.MIN_SENTENCE, synthetic.MAX_SENTENCE
TOKENS_PER_TURN = 20  # average filler turn length (speaker, ":" and 1-3 sentences)


def fact_text(attribute: str, key: str, value: list[str]) -> str:
    """A fact utterance: ``remember the <attribute> of <key> <value...> .``."""
    return " ".join(["remember", "the", attribute, "of", key, *value, "."])


def question_text(attribute: str, key: str, lead: list[str] | tuple[str, ...] = ()) -> str:
    """The question about a fact; it ends with the fact's key, where the answer starts. ``lead`` is an optional
    topical sentence before it (real conversational questions carry a few words of their topic)."""
    return " ".join(["question", ":", *lead, "what", "is", "the", attribute, "of", key])


def _sentence(rng: random.Random, n: int, topic: Topic) -> list[str]:
    """A topic sentence of exactly n tokens (MIN_SENTENCE <= n <= MAX_SENTENCE + 1), ending in '.'."""
    return synthetic._sentence(rng, n, topic.nouns, topic.verbs, topic.adjectives)


def _sentences(rng: random.Random, n_tokens: int, topic: Topic) -> list[list[str]]:
    """Topic sentences with exactly n_tokens tokens in total (n_tokens >= MIN_SENTENCE)."""
    out: list[list[str]] = []
    remaining = n_tokens
    while remaining > 2 * MAX_SENTENCE:
        out.append(_sentence(rng, rng.randint(MIN_SENTENCE, MAX_SENTENCE), topic))
        remaining -= len(out[-1])
    if remaining > MAX_SENTENCE:
        out.append(_sentence(rng, remaining // 2, topic))
        remaining -= remaining // 2
    out.append(_sentence(rng, remaining, topic))
    return out


def _filler_turns(rng: random.Random, n_tokens: int, topic: Topic) -> list[str]:
    """Utterance texts whose turns (with ``speaker :``) total exactly n_tokens tokens."""
    n_turns = max(1, n_tokens // TOKENS_PER_TURN)
    sents = _sentences(rng, n_tokens - 2 * n_turns, topic)  # >= n_turns sentences: each has <= 13 tokens
    cuts = [0, *sorted(rng.sample(range(1, len(sents)), n_turns - 1)), len(sents)]
    return [" ".join(w for s in sents[a:b] for w in s) for a, b in zip(cuts, cuts[1:], strict=False)]


def _session_topics(rng: random.Random, n_sessions: int, topics: list[str]) -> list[str]:
    """Each topic ~n_sessions/len(topics) times, shuffled so that no two adjacent sessions share a topic."""
    order = [topics[i % len(topics)] for i in range(n_sessions)]
    while True:
        rng.shuffle(order)
        if all(a != b for a, b in zip(order, order[1:], strict=False)):
            return order


def _split(rng: random.Random, total: int, n: int) -> list[int]:
    """total split into n parts of random size (each within +-25 % of total / n), summing exactly to total."""
    weights = [rng.uniform(0.75, 1.25) for _ in range(n)]
    parts = [int(total * w / sum(weights)) for w in weights]
    parts[-1] += total - sum(parts)
    return parts


@dataclass
class _Fact:
    topic: str
    qtype: str
    attribute: str
    key: str
    value: list[str]
    session: int = -1
    turn: int = -1
    key_position: int = -1


def _facts(rng: random.Random, n_facts: int, topics: list[str], names: list[str], answer_len: int) -> list[_Fact]:
    """n_facts facts, balanced over topics and question types, with unique keys and answer tokens."""
    codes = iter(rng.sample(ANSWER_CODES, n_facts * answer_len))
    names_it = iter(names)
    facts = []
    for i in range(n_facts):
        topic, qtype = topics[i % len(topics)], QUESTION_TYPES[(i // len(topics)) % len(QUESTION_TYPES)]
        value = [next(names_it)] if qtype == "name" else [next(codes) for _ in range(rng.randint(1, answer_len))]
        facts.append(_Fact(topic, qtype, rng.choice(TOPICS[topic].nouns), next(names_it), value))
    rng.shuffle(facts)
    return facts


def _build_sample(rng: random.Random, sample_id: str, length: int, n_sessions: int, n_speakers: int, n_facts: int,
                  n_questions: int, answer_len: int, meta: dict[str, Any], question_lead: bool = True
                  ) -> Sample:  # fmt: skip
    """One conversation of exactly `length` tokens (incl. <s>)."""
    names = rng.sample(sv.NAMES, n_speakers + 2 * n_facts)
    speakers, fact_names = names[:n_speakers], names[n_speakers:]
    topics = _session_topics(rng, n_sessions, list(TOPICS))
    days = [rng.randint(0, 7)]
    for _ in range(n_sessions - 1):
        days.append(days[-1] + rng.randint(1, 7))
    dates = [DATE_CODES[d] for d in days]
    facts = _facts(rng, n_facts, list(TOPICS), fact_names, answer_len)
    for f in facts:
        f.session = rng.choice([s for s, t in enumerate(topics) if t == f.topic])
    fixed = 1 + sum(len(SESSION_HEADER.format(date=d).split()) for d in dates)
    fixed += sum(2 + len(fact_text(f.attribute, f.key, f.value).split()) for f in facts)
    budgets = _split(rng, length - fixed, n_sessions)
    if min(budgets) < 2 + MIN_SENTENCE:
        raise UsageError(f"length {length} is too short for {n_sessions} sessions and {n_facts} facts")
    turns: list[dict[str, Any]] = []
    lines: list[str] = []
    n_words = 1  # <s>
    speaker = None
    for s, (topic, date, budget) in enumerate(zip(topics, dates, budgets, strict=True)):
        texts: list[str | _Fact] = list(_filler_turns(rng, budget, TOPICS[topic]))
        for f in (f for f in facts if f.session == s):
            texts.insert(rng.randint(0, len(texts)), f)
        lines.append(SESSION_HEADER.format(date=date))
        n_words += len(lines[-1].split())
        for item in texts:
            speaker = rng.choice([p for p in speakers if p != speaker])
            text = item if isinstance(item, str) else fact_text(item.attribute, item.key, item.value)
            if isinstance(item, _Fact):
                item.turn, item.key_position = len(turns), n_words + 2 + 4  # "spk :" + "remember the attr of"
            turns.append({"session": s, "date": date, "speaker": speaker, "text": text})
            lines.append(TURN_FORMAT.format(speaker=speaker, text=text))
            n_words += len(lines[-1].split())
    asked = sorted(rng.sample(range(n_facts), n_questions), key=lambda j: facts[j].turn)
    leads = [_sentence(rng, MIN_SENTENCE, TOPICS[facts[j].topic]) if question_lead else [] for j in asked]
    questions = [
        Question(
            id=f"q{qi}",
            text=question_text(facts[j].attribute, facts[j].key, leads[qi]),
            answers=[" ".join(facts[j].value)],
            meta={"category": facts[j].topic, "question_type": facts[j].qtype, "session": facts[j].session,
                  "turn": facts[j].turn, "key": facts[j].key, "key_position": facts[j].key_position,
                  "depth": round(facts[j].key_position / length, 4)},
        )
        for qi, j in enumerate(asked)
    ]  # fmt: skip
    meta = {**meta, "target_length": length, "context_tokens": n_words, "n_sessions": n_sessions,
            "speakers": speakers, "session_topics": topics, "dates": dates, "n_facts": n_facts,
            "turn_format": TURN_FORMAT, "session_header": SESSION_HEADER, "turns": turns}  # fmt: skip
    return Sample(id=sample_id, context="\n".join(lines), questions=questions, meta=meta)


def make_conversations(
    lengths: list[int], n_samples: int, seed: int = 0, n_sessions: int = 8, n_speakers: int = 3, n_facts: int = 32,
    n_questions: int = 24, answer_len: int = 3, question_lead: bool = True,
) -> list[Sample]:  # fmt: skip
    """Deterministic synthetic conversations, ``n_samples`` per length.

    Args:
        lengths: context lengths in tokens including ``<s>`` (met exactly).
        n_samples: conversations per length.
        seed: each conversation is drawn from its own ``random.Random`` seeded with (seed, length, index).
        n_sessions: sessions per conversation (>= 2 per topic so every topic recurs; at most 16 for the dates).
        n_speakers: speakers per conversation (2-8); consecutive turns have different speakers.
        n_facts: facts per conversation, balanced over the 4 topics and the 2 question types.
        n_questions: questions per conversation (<= n_facts), each about a different fact; the rest are distractors.
        answer_len: at most this many codes per ``code`` answer (1 to MAX_NEW_TOKENS - 1; drawn uniformly).
        question_lead: start every question with a 5-token sentence in its topic's vocabulary (``question : the
            cold river reaches slowly . what is the lake of oscar``), as real conversational questions carry a few
            topic words; without it a question's only topic word is the fact's noun, which a bag-of-words embedder
            (EpiCache's ``llm``) can hardly route on.
    """
    if not len(TOPICS) * 2 <= n_sessions <= 16:
        raise UsageError(f"n_sessions must be in [{2 * len(TOPICS)}, 16] (every topic recurs), got {n_sessions}")
    if not 2 <= n_speakers <= 8:
        raise UsageError(f"n_speakers must be in [2, 8], got {n_speakers}")
    if not 1 <= n_questions <= n_facts or n_speakers + 2 * n_facts > len(sv.NAMES):
        raise UsageError(f"need 1 <= n_questions <= n_facts <= {(len(sv.NAMES) - n_speakers) // 2}")
    if not 1 <= answer_len < MAX_NEW_TOKENS:
        raise UsageError(f"answer_len must be in [1, {MAX_NEW_TOKENS - 1}]")
    samples = []
    for length in lengths:
        for i in range(n_samples):
            rng = random.Random(f"kvbench-conversation/{seed}/{length}/{i}")
            meta = {"kind": "conversation", "seed": seed, "index": i}
            samples.append(_build_sample(rng, f"conversation-L{length}-{i}", length, n_sessions, n_speakers, n_facts,
                                         n_questions, answer_len, meta, question_lead))  # fmt: skip
    return samples

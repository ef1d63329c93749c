"""Tests of the synthetic long-conversation task (kvbench.tasks.conversation) on real tokenizer/model data."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from kvbench.embedded import DEFAULT_DIR
from kvbench.errors import UsageError
from kvbench.runner import run
from kvbench.tasks import conversation as conv
from kvbench.tasks import synthetic_vocab as sv
from kvbench.tasks.base import Sample

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(DEFAULT_DIR)


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return conv.make_conversations([1024, 2048], 2, seed=0)


def test_deterministic_by_seed_and_independent_of_other_lengths(samples: list[Sample]) -> None:
    assert conv.make_conversations([1024, 2048], 2, seed=0) == samples
    other = conv.make_conversations([1024, 2048], 2, seed=1)
    assert all(a.context != b.context for a, b in zip(samples, other, strict=True))
    assert conv.make_conversations([2048], 2, seed=0) == samples[2:]


def test_length_and_vocabulary(samples: list[Sample], tok: PreTrainedTokenizerFast) -> None:
    vocab = set(sv.vocabulary())
    for s in samples:
        ids = tok(s.context, add_special_tokens=True).input_ids
        assert len(ids) == s.meta["context_tokens"] == s.meta["target_length"]
        assert tok.unk_token_id not in ids and set(s.context.split()) <= vocab
        for q in s.questions:
            assert set(q.text.split()) <= vocab


def test_turns_render_the_context(samples: list[Sample]) -> None:
    for s in samples:
        lines, session = [], -1
        for t in s.meta["turns"]:
            if t["session"] != session:
                session = t["session"]
                lines.append(s.meta["session_header"].format(date=t["date"]))
            lines.append(s.meta["turn_format"].format(**t))
        assert "\n".join(lines) == s.context
        sessions = [t["session"] for t in s.meta["turns"]]
        assert sessions == sorted(sessions) and set(sessions) == set(range(s.meta["n_sessions"]))
        assert all(a["speaker"] != b["speaker"] for a, b in zip(s.meta["turns"], s.meta["turns"][1:], strict=False))
        assert {t["speaker"] for t in s.meta["turns"]} == set(s.meta["speakers"]) and len(s.meta["speakers"]) == 3
        days = [int(d[1:]) for d in s.meta["dates"]]
        assert days == sorted(set(days)) and all(f"k{d}" in conv.DATE_CODES for d in days)


def test_topics_recur_in_non_adjacent_sessions(samples: list[Sample]) -> None:
    for s in samples:
        topics = s.meta["session_topics"]
        assert Counter(topics) == {t: 2 for t in conv.TOPICS}
        assert all(a != b for a, b in zip(topics, topics[1:], strict=False))


def test_every_fact_is_where_stated_and_unambiguous(samples: list[Sample], tok: PreTrainedTokenizerFast) -> None:
    for s in samples:
        words = s.context.split()
        turns, speakers = s.meta["turns"], set(s.meta["speakers"])
        content = Counter(w for w in words if w in set(sv.CONTENT_WORDS) and w not in speakers)
        assert max(content.values()) == 1, "a key, name or code occurs twice: the model could copy from elsewhere"
        assert not speakers & {w for t in turns for w in t["text"].split()}, "speakers only as speakers"
        answers = [q.answers[0] for q in s.questions]
        assert len(set(answers)) == len(answers) == 24 and len({q.meta["key"] for q in s.questions}) == 24
        ids = tok(s.context).input_ids
        for q in s.questions:
            key, answer, turn = q.meta["key"], q.answers[0].split(), turns[q.meta["turn"]]
            assert q.text.split()[-1] == key and not set(q.text.split()[:-1]) & set(sv.CONTENT_WORDS)
            assert tok.convert_ids_to_tokens(ids[q.meta["key_position"]]) == key
            assert ids[q.meta["key_position"] + 1 : q.meta["key_position"] + 2 + len(answer)] == \
                tok.convert_tokens_to_ids([*answer, "."])  # fmt: skip
            attribute = q.text.split()[-3]
            assert turn["text"] == conv.fact_text(attribute, key, answer) and turn["session"] == q.meta["session"]
            assert s.meta["session_topics"][q.meta["session"]] == q.meta["category"]
            assert attribute in conv.TOPICS[q.meta["category"]].nouns
            assert (q.meta["question_type"] == "name") == (answer[0] in sv.NAMES) and 1 <= len(answer) <= 3
        assert {q.meta["question_type"] for q in s.questions} == set(conv.QUESTION_TYPES)


def test_topic_vocabularies_are_disjoint_and_cover_the_filler() -> None:
    words = [w for t in conv.TOPICS.values() for w in (*t.nouns, *t.adjectives, *t.verbs)]
    assert len(words) == len(set(words))
    assert set(words) == set(sv.NOUNS + sv.ADJECTIVES + sv.VERBS)


def _bow(text: str) -> Counter:
    return Counter(text.split())


def _cos(a: Counter, b: Counter) -> float:
    dot = sum(a[w] * b[w] for w in a)
    return dot / (sum(v * v for v in a.values()) * sum(v * v for v in b.values())) ** 0.5


def test_sessions_are_closest_to_their_topic_centroid(samples: list[Sample]) -> None:
    for s in samples:
        texts = [" ".join(t["text"] for t in s.meta["turns"] if t["session"] == i) for i in range(8)]
        bows = [_bow(x) for x in texts]
        centroids = {topic: sum((b for b, t in zip(bows, s.meta["session_topics"], strict=True) if t == topic),
                                Counter()) for topic in conv.TOPICS}  # fmt: skip
        for bow, topic in zip(bows, s.meta["session_topics"], strict=True):
            assert max(centroids, key=lambda c, x=bow: _cos(x, centroids[c])) == topic


def test_mean_pooled_model_embeddings_separate_utterance_windows(samples: list[Sample]) -> None:
    """EpiCache's `embedder: llm` view: 4-utterance windows, mean-pooled input embeddings of kvbench-tiny."""
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_DIR)
    tok = AutoTokenizer.from_pretrained(DEFAULT_DIR)
    emb = model.get_input_embeddings().weight.detach()  # [V, hidden]
    for s in samples:
        turns = s.meta["turns"]
        windows = [turns[i : i + 4] for i in range(0, len(turns), 4)]
        windows = [w for w in windows if len({t["session"] for t in w}) == 1]  # those inside one session
        texts = [" ".join(s.meta["turn_format"].format(**t) for t in w) for w in windows]
        vecs = torch.stack([emb[tok(x, add_special_tokens=False).input_ids].mean(0) for x in texts])  # [W, hidden]
        vecs = torch.nn.functional.normalize(vecs, dim=-1)
        labels = [s.meta["session_topics"][w[0]["session"]] for w in windows]
        names = list(conv.TOPICS)
        cents = torch.stack([vecs[[lab == n for lab in labels]].mean(0) for n in names])  # [4, hidden]
        centered = vecs - vecs.mean(0)  # the constant bias dimension dominates raw cosines; compare deviations
        pred = (centered @ (cents - vecs.mean(0)).T).argmax(-1)
        accuracy = sum(names[p] == lab for p, lab in zip(pred.tolist(), labels, strict=True)) / len(labels)
        assert accuracy >= 0.95, accuracy


def test_bad_parameters_are_one_clear_error() -> None:
    for kw in ({"n_sessions": 4}, {"n_sessions": 17}, {"n_speakers": 1}, {"n_questions": 33},
               {"n_facts": 60}, {"answer_len": 8}):  # fmt: skip
        with pytest.raises(UsageError):
            conv.make_conversations([2048], 1, **kw)
    with pytest.raises(UsageError, match="too short"):
        conv.make_conversations([400], 1)


def _run(tmp_path: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.results={tmp_path}", "progress=false", "task=synth_conversation",
                                           "protocol=query_agnostic", "task.loader.lengths=[2048]",
                                           "task.loader.n_samples=2", *overrides])  # fmt: skip
    return run(cfg)


def test_full_cache_answers_and_query_agnostic_snapkv_falls_behind(tmp_path: Path) -> None:
    full = _run(tmp_path, "method=fullkv", "budget=1.0")
    assert full["n_questions"] == 48
    assert full["score"]["exact_match"] >= 90 and full["score"]["qa_f1"] >= 90
    snap = _run(tmp_path, "method=snapkv", "budget=0.1")
    assert snap["score"]["exact_match"] <= full["score"]["exact_match"] - 20
    assert snap["score"]["exact_match"] <= snap["score"]["qa_f1"] <= full["score"]["qa_f1"] - 20

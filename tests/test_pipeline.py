"""Prompt encoding (plain, chat template split at the context/question boundary, middle truncation) and answers."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from kvbench.models import ASSETS
from kvbench.pipeline import encode, postprocess


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ASSETS / "kvbench-tiny")


def test_plain_prompt_is_context_with_bos_then_question(tok) -> None:
    ctx, q = encode(tok, "the code of alice k1 k2 .", "question : what is the code of alice", False, None)
    assert ctx[0] == tok.bos_token_id and tok.bos_token_id not in q
    assert ctx + q == tok("the code of alice k1 k2 . question : what is the code of alice").input_ids


def test_chat_template_is_split_at_the_question(tok) -> None:
    tok = AutoTokenizer.from_pretrained(ASSETS / "kvbench-tiny")
    tok.chat_template = "{% for m in messages %}<s> question : {{ m['content'] }} . what :{% endfor %}"
    ctx, q = encode(tok, "the code of alice k1", "alice", True, None)
    words = tok.convert_ids_to_tokens(ctx + q)
    assert words == ["<s>", "question", ":", "the", "code", "of", "alice", "k1", "alice", ".", "what", ":"]
    assert tok.convert_ids_to_tokens(q) == ["alice", ".", "what", ":"]  # the template suffix goes with the question
    assert encode(tok, "the code of alice k1", "alice", False, None)[0][0] == tok.bos_token_id  # chat=False: plain


def test_long_context_is_cut_in_the_middle(tok) -> None:
    context = " ".join(f"k{i}" for i in range(100))
    ctx, q = encode(tok, context, "alice", False, max_length=21)
    assert len(ctx) + len(q) == 21  # (21 - 1 question token) // 2 = 10 context tokens from each end
    assert tok.convert_ids_to_tokens(ctx) == ["<s>"] + [f"k{i}" for i in range(9)] + [f"k{i}" for i in range(90, 100)]


def test_answer_is_cut_at_the_first_stop(tok) -> None:
    ids = tok("k1 k2 . k3 .", add_special_tokens=False).input_ids
    assert postprocess(tok, ids, ["."]) == "k1 k2"
    assert postprocess(tok, ids, []) == "k1 k2 . k3 ."

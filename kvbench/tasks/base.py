"""Task data model: a sample is one context with one or more questions about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Question:
    """One question about a context.

    Attributes:
        id: unique within its sample.
        text: the question text, appended after the context (it must end where the answer starts).
        answers: reference answers; metrics take the best match over them.
        meta: free-form per-question metadata (e.g. needle depth, category).
        answer_prefix: text that starts the answer (RULER's ``answer_prefix``): it follows the question, and with
            a chat template it comes *after* the template's assistant header, pre-filling the reply.
    """

    id: str
    text: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    answer_prefix: str = ""


@dataclass
class Sample:
    """One context shared by several questions (query-agnostic runs compress it once for all of them).

    Attributes:
        id: unique within the task.
        context: the long text that gets compressed.
        questions: at least one question.
        meta: free-form metadata (e.g. target context length in tokens, seed).
    """

    id: str
    context: str
    questions: list[Question]
    meta: dict[str, Any] = field(default_factory=dict)

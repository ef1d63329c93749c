"""Task data model: a sample is one context with one or more questions about it.

Vision-language samples carry their images (and video frames) next to the text: ``Sample.images`` in the order of
their :data:`IMAGE` placeholders in ``context`` (then in the questions' texts), ``Sample.frames`` for the one
:data:`VIDEO` placeholder. Model adapters replace each placeholder with the model's own vision tokens (Qwen2-VL
``<|vision_start|><|image_pad|><|vision_end|>``, LLaVA ``<image>``), so cache slot i = input position i holds the
expanded image tokens. ``Sample.messages`` gives the context as chat turns when it is a multi-turn history
(AgentNetBench: earlier screenshots as user turns, the model's earlier outputs as assistant turns)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: Where one image of ``Sample.images`` sits in the text (context first, then question texts, in order).
IMAGE = "<|kvbench_image|>"
#: Where the video (``Sample.frames``, in order) sits in the text; at most one per sample.
VIDEO = "<|kvbench_video|>"


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
        images: one entry per :data:`IMAGE` placeholder, in text order: a file path (opened when the prompt is
            built, see :func:`kvbench.tasks.vision.load_image`) or an in-memory ``PIL.Image``.
        frames: the video's frames for the :data:`VIDEO` placeholder, in time order: a sequence of images (e.g. a
            lazy :class:`kvbench.tasks.vision.VideoFrames`, decoded when the prompt is built). Empty: no video.
        messages: the context as chat turns ``[{"role": "user"|"assistant", "content": str | [{"type": "image"} |
            {"type": "text", "text": ...}]}]`` (images in ``images`` order), or None: ``context`` is one user turn.
            A question's text goes after the last user turn's content.
    """

    id: str
    context: str
    questions: list[Question]
    meta: dict[str, Any] = field(default_factory=dict)
    images: list[Any] = field(default_factory=list)
    frames: Sequence[Any] = ()
    messages: list[dict[str, Any]] | None = None

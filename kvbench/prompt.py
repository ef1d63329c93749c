"""Official-benchmark prompting: one prompt string tokenized once, split at the context/question boundary.

The default pipeline encoding (``pipeline.encode``) tokenizes context and question separately. Benchmarks whose
official scripts tokenize one formatted prompt (LongBench's ``pred.py``) use ``tokenize: joint`` in their task
YAML instead: the prompt ``context + question`` (already formatted with the dataset template by the loader) is

1. optionally cut in the middle (``truncation``):
   * ``context``: keep the first and last halves of the *context* tokens so that prompt <= max_length (default);
   * ``prompt_text``: LongBench ``pred.py``: if the whole prompt, tokenized with the tokenizer's default special
     tokens, exceeds ``max_length`` tokens, it becomes ``decode(ids[:half]) + decode(ids[-half:])`` (half =
     ``int(max_length / 2)``, special tokens skipped), a *string*, before any chat template;
2. wrapped in the chat template when the run uses one (``apply_chat_template`` on one user turn, generation prompt
   added; ``chat_kwargs`` such as Qwen3's ``enable_thinking``);
3. tokenized once, with the tokenizer's special tokens for a raw prompt (BOS) and, for a chat-templated prompt, only
   if ``chat_special_tokens`` (true reproduces CAKE's / the official script's double BOS with templates that
   already start with BOS; false, the default, gives one BOS);
4. split at the character boundary between context and question (offsets of a fast tokenizer); a token that
   straddles the boundary belongs to the context. The context part can be compressed alone (query-agnostic runs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: kvbench.validate reads this module's constants before transformers loads
    from transformers import PreTrainedTokenizerBase

SPLIT = "\u241eKVBENCH-SPLIT\u241e"
TRUNCATIONS = ("context", "prompt_text")
POSTPROCESS = ("strip", "first_line")


def truncate_prompt_text(tok: PreTrainedTokenizerBase, text: str, cut: int, max_length: int) -> tuple[str, int]:
    """LongBench ``pred.py`` middle truncation of the prompt string; returns the new text and boundary."""
    ids = tok(text, add_special_tokens=True).input_ids
    if len(ids) <= max_length:
        return text, cut
    half = int(max_length / 2)
    head = tok.decode(ids[:half], skip_special_tokens=True)
    tail = tok.decode(ids[-half:], skip_special_tokens=True)
    new = head + tail
    question = text[cut:]
    decoded_q = tok.decode(tok(question, add_special_tokens=False).input_ids, skip_special_tokens=True)
    for q in (question, decoded_q):  # decode may normalise spaces (clean_up_tokenization_spaces)
        if q and tail.endswith(q):
            return new, len(new) - len(q)
    return new, len(head)  # the question itself was cut: everything after the seam counts as question


def split_ids(tok: PreTrainedTokenizerBase, text: str, cut: int, add_special_tokens: bool
              ) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` split at character ``cut`` (a token that straddles it goes to the first part)."""
    if not getattr(tok, "is_fast", False):  # no offsets: tokenize the two parts separately
        return (tok(text[:cut], add_special_tokens=add_special_tokens).input_ids,
                tok(text[cut:], add_special_tokens=False).input_ids)
    enc = tok(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids, offsets = enc.input_ids, enc.offset_mapping
    n = next((i for i, (s, e) in enumerate(offsets) if s >= cut and e > s), len(ids))
    return ids[:n], ids[n:]


def encode_joint(tok: PreTrainedTokenizerBase, context: str, question: str, *, chat: bool,
                 max_length: int | None, truncation: str = "context", chat_special_tokens: bool = False,
                 chat_kwargs: dict[str, Any] | None = None, answer_prefix: str = "") -> tuple[list[int], list[int]]:
    """(context ids, question ids) of the prompt ``context + question`` tokenized as one string (module doc)."""
    text, cut = context + question, len(context)
    if max_length and truncation == "prompt_text":
        text, cut = truncate_prompt_text(tok, text, cut, max_length)
    add_special = True
    if chat and getattr(tok, "chat_template", None):
        rendered = tok.apply_chat_template([{"role": "user", "content": text[:cut] + SPLIT + text[cut:]}],
                                           tokenize=False, add_generation_prompt=True, **(chat_kwargs or {}))
        prefix, suffix = rendered.split(SPLIT)
        text, cut, add_special = prefix + suffix, len(prefix), chat_special_tokens
    ctx, q = split_ids(tok, text + answer_prefix, cut, add_special)
    if max_length and truncation == "context" and len(ctx) + len(q) > max_length:
        half = (max_length - len(q)) // 2
        ctx = ctx[:half] + ctx[len(ctx) - half :]
    return ctx, q


def postprocess_text(text: str, steps: list[str]) -> str:
    """Apply named answer post-processing steps in order: ``strip``; ``first_line`` (LongBench ``eval.py`` for
    trec/triviaqa/samsum/lsht: ``text.lstrip("\\n").split("\\n")[0]``)."""
    for step in steps:
        if step == "strip":
            text = text.strip()
        elif step == "first_line":
            text = text.lstrip("\n").split("\n")[0]
        else:
            raise ValueError(f"unknown postprocess step {step!r}; choose from {', '.join(POSTPROCESS)}")
    return text

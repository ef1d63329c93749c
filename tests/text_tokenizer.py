"""A small byte-level BPE tokenizer trained on the spot: it round-trips any text (unlike kvbench-tiny's word-level
vocabulary), so benchmark builders that cut and decode token ranges can be checked on real text offline."""

from __future__ import annotations

from functools import cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "One of the special magic numbers for the key is: 1234567. What are all the special magic numbers?",
    "This is a test of long-text capability. Based on the information in the document, now please answer:",
    "Startups grow by solving problems for users. Essays about startups, founders and investors.",
    "Below is a conversation between two people. DATE: CONVERSATION: said, shared an image of",
]


@cache
def byte_bpe(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style pre-tokenisation) trained on :data:`CORPUS`; deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")

"""The text condition through transformers' own T5 encoder (``T5EncoderModel``), as Infinity's
``tools/run_infinity.py`` ``encode_prompt`` does: tokenise (max 512 tokens, padded), take the encoder's
``last_hidden_state`` in fp32 and keep each prompt's valid tokens (its attention mask).

* Released models: ``google/flan-t5-xl`` (d_model 2048 = Infinity's ``text_channels``) with its tokenizer, loaded
  by ``from_pretrained`` at a pinned revision from a local path or the hub cache.
* The tiny model: a small ``T5EncoderModel`` built from a ``T5Config`` offline (weights in the model's
  safetensors under ``t5.``) with transformers' ``ByT5Tokenizer`` (bytes as tokens: no vocabulary file to download).
  This is the same T5 encoder code; only its size and tokenizer differ.

Where we deviate: Infinity packs the valid tokens of the batch into one varlen sequence for flash-attn; we keep the
padded (B, T, C) batch and its mask (the attention layers mask the padding, which is exact). The authors run the
encoder in fp16 and cast its output to fp32; we run it in fp32 (the runner's one dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kvbench.errors import UsageError

MAX_TOKENS = 512  # Infinity's tokenizer max_length


@dataclass
class TextEncoder:
    """A tokenizer and a ``T5EncoderModel`` (eval mode, fp32)."""

    tokenizer: Any
    encoder: Any
    max_tokens: int = MAX_TOKENS

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """prompts -> features (B, T, Ct5) fp32 (zero on padding) and mask (B, T) bool; T = the longest prompt."""
        device = next(self.encoder.parameters()).device
        tok = self.tokenizer(list(prompts), max_length=self.max_tokens, padding="longest", truncation=True,
                             return_tensors="pt")
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        feats = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return feats * mask[..., None], mask.bool()


def tiny_t5(spec: dict[str, Any]) -> Any:
    """An untrained ``T5EncoderModel`` of the given ``T5Config`` fields (its weights are loaded next)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**spec)).eval()


def byte_tokenizer() -> Any:
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def pretrained_t5(path: str, revision: str | None, device: str | torch.device) -> TextEncoder:
    """``google/flan-t5-xl`` (or a local copy) at ``revision``; one message when it is not available offline."""
    from transformers import AutoTokenizer, T5EncoderModel

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, legacy=True)
        enc = T5EncoderModel.from_pretrained(path, revision=revision, torch_dtype=torch.float32)
    except OSError as err:
        raise UsageError(f"text encoder {path!r} (revision {revision}) could not be loaded: download it into the hub "
                         f"cache or point model.text_encoder at a local folder ({err})") from err
    return TextEncoder(tok, enc.to(device).eval())

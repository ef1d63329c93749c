"""Infinity (FoundationVision/Infinity, MIT): text-to-image next-scale generation with bitwise tokens, on the VAR
runner's cache and compression seam (``model=kvbench-tiny-infinity task=infinity_prompts``; docs/var.md).

Modules: ``model`` (the transformer, checkpoint names), ``rope`` (2-D RoPE), ``bsq`` (bitwise tokens and the
tokenizer), ``text`` (the T5 condition), ``schedule`` (scale schedules), ``generate`` (the sampling loop),
``load`` (embedded and released weights).
"""

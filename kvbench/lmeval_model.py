"""The lm-eval model ``kvbench`` (:class:`KVBenchLM`): see :mod:`kvbench.lmeval` for what it does and how to run it.

Kept apart from :mod:`kvbench.lmeval` (the CLI and the config checks) so that ``python -m kvbench.lmeval --help``
and a bad option answer without loading torch, transformers and the engine.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from kvbench.compat import ENGINE_DEFAULT, ModelCapabilities, check_compatible
from kvbench.engine import Engine
from kvbench.errors import UsageError
from kvbench.lmeval import lmeval_device, model_config
from kvbench.models import load_model, pick_device
from kvbench.pipeline import encode, prefill, stopper
from kvbench.runner import build


@register_model("kvbench")
class KVBenchLM(TemplateLM):
    """An lm-eval model that answers with kvbench's engine under a KV-cache method and budget.

    Args:
        pretrained: an in-memory ``PreTrainedModel`` (then pass ``tokenizer``), a ``conf/model`` option name
            (``kvbench-tiny``), or a hub id / local directory (``model=hf``). Or give ``model=...`` overrides.
        tokenizer: the tokenizer of an in-memory model.
        split: marker at which prompts are split into context and question (needed for ``query_agnostic``).
        max_gen_toks: default generation limit when a task sets none (lm-eval's default, 256).
        batch_size, max_batch_size, device: lm-eval's standard arguments (``device`` becomes kvbench's unless
            ``device`` is also a kvbench override; lm-eval's default ``cuda:0`` falls back to the CPU without CUDA).
        model_caps: what the engine supports for this model family (the per-family adapter declares it).
        **overrides: kvbench config overrides: ``method``, ``budget``, ``allocator``, ``protocol``,
            ``prefill_chunk``, ``seed``, ``threads``, ``model.*``, ``method.*`` ...
    """

    def __init__(self, pretrained: Any = None, tokenizer: Any = None, split: str | None = None,
                 max_gen_toks: int = 256, batch_size: Any = 1, max_batch_size: Any = None, device: str | None = None,
                 model_caps: ModelCapabilities = ENGINE_DEFAULT, **overrides: Any) -> None:
        super().__init__()
        in_memory = pretrained is not None and not isinstance(pretrained, str)
        if device is not None and "device" not in overrides:  # kvbench's own device= override wins
            overrides["device"] = lmeval_device(device)
        self.cfg = cfg = model_config(None if in_memory else pretrained, split, **overrides)
        self.method, self.allocator = build(cfg.method, "method"), build(cfg.allocator, "allocator")
        self.budget = float(cfg.budget)
        self.protocol, self.split, self.max_gen_toks = str(cfg.protocol), split, int(max_gen_toks)
        check_compatible(self.method, self.allocator, self.protocol, cfg.prefill_chunk, model_caps,
                         episodic_supported=False)  # the runner's own check
        if in_memory:
            if tokenizer is None:
                raise UsageError("an in-memory model needs its tokenizer: KVBenchLM(pretrained=model, tokenizer=tok)")
            self.model, self.tokenizer = pretrained.eval(), tokenizer
        else:
            self.model, self.tokenizer = load_model(cfg.model, pick_device(str(cfg.device)))
        if self.device.type == "cpu" and cfg.get("threads"):
            torch.set_num_threads(int(cfg.threads))  # as in kvbench runs (1 by default)
        torch.manual_seed(int(cfg.seed))
        self.records: list[dict[str, Any]] = []  # per-request cache statistics (kept fraction, KV bytes, times)

    # -- what lm-eval asks of a model ---------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "kvbench")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def engine(self) -> Engine:
        return Engine(self.model, self.method, self.allocator, self.budget,
                      backend=self.cfg.model.attn_implementation)

    # -- generation ---------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        with self.engine() as engine:
            for req in tqdm(requests, desc=f"kvbench {self.cfg.method.name} b={self.budget}", disable=disable_tqdm,
                            file=sys.stderr):
                context, gen_kwargs = req.args
                kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
                if kwargs.get("do_sample"):
                    raise UsageError("kvbench decodes greedily; this task asks for do_sample=true (override the "
                                     "task's generation_kwargs with do_sample: false)")
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                logits = self._prompt_logits(engine, context)
                tokens, times = engine.generate(logits, int(kwargs["max_gen_toks"]), stopper(self.tokenizer, until))
                text = postprocess_generated_text(self.tokenizer.decode(tokens, skip_special_tokens=True), until,
                                                  None)
                self.records[-1].update(new_tokens=len(tokens), decode_s_per_token=statistics.fmean(times)
                                        if times else None)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                out.append(text)
        return out

    def _prompt_logits(self, engine: Engine, prompt: str) -> torch.Tensor:
        """Prefill the prompt under the protocol; the logits of the next token."""
        context, question = prompt, ""
        if self.split:
            cut = prompt.rfind(self.split)
            if cut < 0:
                raise UsageError(f"split marker {self.split!r} is not in the prompt: {prompt[-200:]!r}")
            context, question = prompt[:cut], prompt[cut:]
        ctx, q = encode(self.tokenizer, context, question, False, self.cfg.model.get("max_length"))
        if self.protocol == "query_agnostic":
            _, stats = prefill(engine, ctx, {"context": (0, len(ctx))}, self.cfg.prefill_chunk)
            logits = engine.forward(q)
        else:
            spans = {"context": (0, len(ctx)), "question": (len(ctx), len(ctx) + len(q))}
            logits, stats = prefill(engine, ctx + q, spans, self.cfg.prefill_chunk)
        self.records.append({**stats, "context_tokens": len(ctx), "question_tokens": len(q)})
        return logits

    # -- scoring ------------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Each distinct context is compressed once; every continuation is scored over it and rolled back."""
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, _) in enumerate(requests):
            by_context.setdefault(tuple(ctx), []).append(i)
        with self.engine() as engine:
            for ctx, idx in tqdm(by_context.items(), desc="kvbench loglikelihood", disable=disable_tqdm,
                                 file=sys.stderr):
                logits0, stats = prefill(engine, list(ctx), {"context": (0, len(ctx))}, self.cfg.prefill_chunk)
                snap = engine.store.snapshot()
                for i in idx:
                    key, _, cont = requests[i]
                    engine.store.rollback(snap)
                    out[i] = self._score(engine, logits0, cont)
                    self.records.append({**stats, "context_tokens": len(ctx), "question_tokens": len(cont)})
                    self.cache_hook.add_partial("loglikelihood", key, out[i])
                engine.store.rollback(snap)
        return out

    @staticmethod
    def _score(engine: Engine, logits: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
        """Sum of log-probabilities of ``cont`` after ``logits`` (appended uncompressed), and whether it is greedy."""
        total, greedy = 0.0, True
        for i, token in enumerate(cont):
            logp = torch.log_softmax(logits.float(), dim=-1)  # (vocab,)
            total += float(logp[token])
            greedy = greedy and int(logp.argmax()) == token
            if i + 1 < len(cont):
                logits = engine.forward([token])
        return total, greedy

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise UsageError("kvbench does not score loglikelihood_rolling (perplexity) tasks: under KV compression "
                         "it depends on when the cache is compressed; use generate_until or multiple-choice tasks")

    def kv_summary(self) -> dict[str, float | None]:
        """Mean cache statistics over the requests answered so far (kept fraction, KV bytes, times)."""
        keys = ("kept_fraction", "kv_bytes_full", "kv_bytes_kept", "prefill_s", "compress_s", "decode_s_per_token")
        return {k: statistics.fmean(v) if (v := [r[k] for r in self.records if r.get(k) is not None]) else None
                for k in keys}

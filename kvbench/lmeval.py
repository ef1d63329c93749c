"""lm-eval bridge: any lm-evaluation-harness task under any kvbench method and budget.

Registers the lm-eval model ``kvbench`` (``lm_eval.api.registry.register_model``), which runs every request
through the same engine and budget semantics as ``python -m kvbench`` (``kvbench.engine.Engine``,
``kvbench.pipeline``): the prompt is prefilled, every layer is compressed to the budget by the method and
allocator, and the answer is decoded greedily over the compressed cache. ``model_args`` are kvbench overrides::

    python -m kvbench.lmeval --model kvbench --tasks gsm8k \\
        --model_args model=hf,model.pretrained=Qwen/Qwen2.5-7B-Instruct,method=snapkv,budget=0.2
    python -m kvbench.lmeval --model kvbench --model_args pretrained=kvbench-tiny,method=adakv,budget=0.1 \\
        --include_path my_tasks/ --tasks my_task

(``python -m kvbench.lmeval`` is lm-eval's own CLI with this model registered; in Python, import this module
and pass ``KVBenchLM(...)`` or ``model="kvbench"`` to ``lm_eval.simple_evaluate``.)

Request types:
  * ``generate_until``: greedy only (``do_sample: true`` is refused). Stop strings, the EOS stop and the
    ``max_gen_toks`` default (256) follow lm-eval's ``HFLM``; the output is cut at the first stop string and not
    stripped, as HFLM does.
  * ``loglikelihood`` (multiple choice): the context is compressed (once for all its choices), then each
    continuation is scored token by token over the compressed cache (it is never compressed itself).
  * ``loglikelihood_rolling`` (perplexity) is refused: with compression it depends on where one compresses.

Protocols: ``query_aware`` (default) compresses the whole prompt, so the observation window holds its end (the
question, for the usual ``...Question: ...\\nAnswer:`` templates), as the SnapKV/PyramidKV LongBench scripts do.
``query_agnostic`` needs ``split=<marker>``: the prompt is cut at the marker's last occurrence, the part before it
is compressed alone and the rest (question) is appended uncompressed, as in kvbench's query-agnostic runs.

Deviations from ``HFLM``: prompts are tokenized as kvbench does (tokenizer's default special tokens, contexts
longer than ``model.max_length`` cut in the middle, where HFLM cuts on the left), one request at a time
(``batch_size`` is accepted and ignored), and no sampling.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from omegaconf import OmegaConf
from tqdm import tqdm

from kvbench.compat import ENGINE_DEFAULT, ModelCapabilities, check_compatible
from kvbench.engine import Engine
from kvbench.errors import UsageError
from kvbench.models import load_model, pick_device
from kvbench.pipeline import encode, prefill, stopper
from kvbench.runner import build
from kvbench.validate import check_config

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _override(key: str, value: Any) -> str:
    """One Hydra override from an lm-eval model argument (lm-eval has already turned "0.2" into 0.2)."""
    if isinstance(value, bool):
        value = str(value).lower()
    elif value is None:
        value = "null"
    return f"{key}={value}"


def compose_config(overrides: dict[str, Any]):
    """kvbench's composed config (``conf/config.yaml``) with these overrides, validated like a run."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            cfg = compose("config", overrides=[_override(k, v) for k, v in overrides.items()])
        except Exception as err:  # Hydra's errors name the bad key/option and list the valid ones
            raise UsageError(f"invalid kvbench model_args for lm-eval: {err}") from err
    check_config(cfg)
    if OmegaConf.is_list(cfg.budget):
        raise UsageError(f"the lm-eval bridge runs one budget at a time, got budget={list(cfg.budget)}")
    return cfg


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
        if isinstance(pretrained, str):
            options = {p.stem for p in (CONF_DIR / "model").glob("*.yaml")}
            overrides = ({"model": pretrained} if pretrained in options
                         else {"model": "hf", "model.pretrained": pretrained}) | overrides
        if device is not None and "device" not in overrides:  # kvbench's own device= override wins
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI asks for cuda:0 by default; like its HFLM, fall back instead of failing
                print(f"[kvbench] lm-eval device={device} but CUDA is not available: using the CPU", file=sys.stderr)
                device = "cpu"
            overrides["device"] = device
        self.cfg = cfg = compose_config(overrides)
        self.method, self.allocator = build(cfg.method, "method"), build(cfg.allocator, "allocator")
        self.budget = float(cfg.budget)
        self.protocol, self.split, self.max_gen_toks = str(cfg.protocol), split, int(max_gen_toks)
        if self.protocol == "query_agnostic" and not split:
            raise UsageError("protocol=query_agnostic needs split=<marker> (e.g. split='Question:'): the prompt part "
                             "before the marker's last occurrence is compressed before the question is seen")
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


def main() -> None:
    """lm-eval's CLI with the ``kvbench`` model registered (``python -m kvbench.lmeval --model kvbench ...``)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()

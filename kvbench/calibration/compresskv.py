"""CompressKV's offline calibration: semantic retrieval heads (methods_core §4.3) and layer error scores (§4.4).

Both run the model with the full cache (its own transformers cache) under a registered attention function that
computes exact attention and, on the side, what the calibration needs:

* **Semantic retrieval heads.** Needle prompts are prefilled except their last token, then decoded greedily. At each
  step whose generated token t occurs inside the needle's answer span [s, e) of the prompt, every (layer, query
  head) adds the attention mass its last query puts on the whole span, once per occurrence of t in the span. A test
  counts only if the answer's ROUGE-1 recall is above ``min_recall`` (0.5, the authors' "> 50"); a head's score is
  the mean of its per-test sums over the counted tests, and each layer's heads are ranked by it (ties: lower head).
* **Layer error scores.** Full-cache greedy generation; at prefill each layer simulates CompressKV's selection at a
  budget of 32 tokens (24 by the semantic retrieval heads + window 8); at every decode step both the full attention
  output and the output over the simulated cache (selection + all generated tokens) go through ``o_proj`` and the
  relative Frobenius error ||O_c - O_f|| / (||O_f|| + 1e-5) is accumulated per layer. Per data group (the authors'
  LongBench datasets; here the synthetic kinds) the sums are L1-normalised over layers, then averaged over groups
  and normalised again: u.

Data: the authors used three hand-written needles in Paul Graham essays for the heads and the LongBench *test* set for
the errors. kvbench generates both (``kvbench.tasks.synthetic`` needles and multi-key contexts, or random token-id
haystacks for models without a tokenizer) from seeds that the evaluation tasks do not use, so the calibration is
held out from every kvbench evaluation. Deviations: ROUGE-1 recall is computed on lower-cased alphanumeric words
without the Porter stemmer (answers are codes; avoids an nltk dependency); questions use the synthetic task's
format ("question : what is the code of <key>"), not "Based on the content of the book, Question: ...\\nAnswer:";
attention is computed in fp32 for the probes.
"""

from __future__ import annotations

import inspect
import json
import random
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedTokenizerBase

from kvbench.engine.context import LayerContext
from kvbench.engine.engine import attention_modules
from kvbench.errors import UsageError
from kvbench.identity import sha256_file
from kvbench.pipeline import encode
from kvbench.tasks.synthetic import make_samples
from methods.compresskv import FORMAT, VERSION, srh_scores

ATTN_NAME = "kvbench_compresskv_calibration"


@dataclass
class Probe:
    """One calibration prompt.

    Attributes:
        ids: prompt token ids. span: the needle's answer span [s, e) in ``ids`` (head detection), or None.
        reference: the answer as recall units (words, or token ids for models without a tokenizer).
        group: data group for the per-group normalisation of the error scores (the authors' dataset).
    """

    ids: list[int]
    span: tuple[int, int] | None
    reference: list[Any]
    group: str = ""


@dataclass
class Reader:
    """How generated tokens are read: recall units, stopping, end of sequence."""

    units: Callable[[list[int]], list[Any]]
    stop: Callable[[list[int]], bool]
    eos: int | None = None


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    """ROUGE-1 units: lower-cased alphanumeric runs (rouge_score's tokenizer, without stemming)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge1_recall(reference: list[Any], prediction: list[Any]) -> float:
    """Clipped unigram overlap / reference length."""
    if not reference:
        return 0.0
    pool: dict[Any, int] = {}
    for x in prediction:
        pool[x] = pool.get(x, 0) + 1
    hit = 0
    for x in reference:
        if pool.get(x, 0) > 0:
            pool[x] -= 1
            hit += 1
    return hit / len(reference)


def locate(tok: PreTrainedTokenizerBase, ids: list[int], answer: str) -> tuple[int, int] | None:
    """The answer's span in the prompt, as the authors find it: the first window of its length whose token set
    covers > 90 % of the answer's token set (the answer tokenised alone and after a space)."""
    for text in (answer, " " + answer):
        target = tok(text, add_special_tokens=False).input_ids
        want = set(target)
        for i in range(len(ids) - len(target) + 1):
            if len(want & set(ids[i : i + len(target)])) / len(want) > 0.9:
                return i, i + len(target)
    return None


def text_probes(tok: PreTrainedTokenizerBase, kind: str, lengths: list[int], n_samples: int, seed: int,
                depths: list[float] | None = None, chat: bool = False, max_length: int | None = None) -> list[Probe]:
    """Probes from ``kvbench.tasks.synthetic`` (``kind`` needle or multikey) encoded as the pipeline encodes them."""
    samples = make_samples(kind=kind, n_samples=n_samples, lengths=lengths, seed=seed, depths=depths)
    probes = []
    for s in samples:
        for q in s.questions:
            ctx, question = encode(tok, s.context, q.text, chat, max_length)
            ids = ctx + question
            probes.append(Probe(ids, locate(tok, ctx, q.answers[0]), words(q.answers[0]), kind))
    return probes


def token_probes(vocab: int, lengths: list[int], n_samples: int, seed: int, depths: list[float],
                 key_len: int = 2, answer_len: int = 3) -> list[Probe]:
    """Needles in random token-id haystacks for a model without a tokenizer: the haystack avoids the needle's ids,
    the needle is key + answer, and the prompt ends with the key again, so the answer is its continuation."""
    probes = []
    for length in lengths:
        for depth in depths:
            for i in range(n_samples):
                rng = random.Random(f"kvbench-compresskv-tokens/{seed}/{length}/{depth}/{i}")
                needle = rng.sample(range(vocab), key_len + answer_len)
                others = [t for t in range(vocab) if t not in needle]
                hay = rng.choices(others, k=length - len(needle) - key_len)
                at = round(depth * len(hay))
                ids = hay[:at] + needle + hay[at:] + needle[:key_len]
                span = (at + key_len, at + len(needle))
                probes.append(Probe(ids, span, needle[key_len:], f"tokens-d{depth}"))
    return probes


def text_reader(tok: PreTrainedTokenizerBase, stop: list[str]) -> Reader:
    """Recall on words of the answer cut at the first stop string; stop at a stop string, a newline or EOS."""

    def cut(tokens: list[int]) -> str:
        text = tok.decode(tokens, skip_special_tokens=True)
        for s in [*stop, "\n"]:
            text = text.split(s, 1)[0]
        return text

    def should_stop(tokens: list[int]) -> bool:
        text = tok.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in [*stop, "\n"])

    return Reader(lambda t: words(cut(t)), should_stop, tok.eos_token_id)


def token_reader() -> Reader:
    return Reader(list, lambda tokens: False, None)


# ---------------------------------------------------------------------------------------------------------------
# the probing attention function
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Recorder:
    """What the attention function computes on the side, per layer."""

    mode: str = "off"  # off | srh | error
    span: tuple[int, int] = (0, 0)
    heads: list[list[int]] = field(default_factory=list)
    first_k: int = 4
    window: int = 8
    kernel: int = 5
    budget: int = 32
    mass: dict[int, Tensor] = field(default_factory=dict)  # layer -> (H_q,) attention on the span (last query)
    kept: dict[int, Tensor] = field(default_factory=dict)  # layer -> kept prompt indices of the simulated cache
    n_prompt: int = 0
    errors: dict[int, float] = field(default_factory=dict)


def _attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
               dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """Exact causal attention over the transformers cache (batch 1), plus the recorder's side computations.

    query (1, H_q, q, d), key/value (1, H_kv, n, d) post-RoPE, the cache already updated -> (1, q, H_q, d).
    """
    rec: _Recorder = module._kvbench_calibration
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)  # (1, H_q, n, d)
    q_len, n = query.shape[2], key.shape[2]
    if q_len > 1 and q_len != n:
        raise RuntimeError("calibration prefills once, then decodes one token at a time")
    out = F.scaled_dot_product_attention(query, k, v, is_causal=q_len > 1, scale=scale)  # (1, H_q, q, d)
    i = module.layer_idx
    if rec.mode == "srh" and q_len == 1:
        probs = (torch.einsum("hd,hnd->hn", query[0, :, 0].float(), k[0].float()) * scale).softmax(-1)  # (H_q, n)
        rec.mass[i] = probs[:, rec.span[0] : rec.span[1]].sum(-1)
    elif rec.mode == "error" and q_len > 1:
        rec.n_prompt = n
        rec.kept[i] = _simulated_selection(rec, module, query[0], key[0], value[0], scale)
    elif rec.mode == "error":
        idx = torch.cat([rec.kept[i], torch.arange(rec.n_prompt, n, device=key.device)])
        small = F.scaled_dot_product_attention(query, k[:, :, idx], v[:, :, idx], scale=scale)
        full_o = module.o_proj(out.transpose(1, 2).reshape(1, 1, -1)).float()  # (1, 1, hidden)
        comp_o = module.o_proj(small.transpose(1, 2).reshape(1, 1, -1)).float()
        err = (comp_o - full_o).norm() / (full_o.norm() + 1e-5)
        rec.errors[i] = rec.errors.get(i, 0.0) + float(err)
    return out.transpose(1, 2).contiguous(), None


def _simulated_selection(rec: _Recorder, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """CompressKV's prefill selection at the calibration budget (sorted kept indices), as the method scores it."""
    n = k.shape[1]
    if n <= rec.budget:
        return torch.arange(n, device=k.device)
    ctx = LayerContext(layer_idx=module.layer_idx, n_layers=len(rec.heads), module=module, queries=q, keys=k,
                       values=v, positions=torch.arange(n, device=k.device), window=rec.window, keep=rec.budget,
                       scaling=scale)
    s = srh_scores(ctx.window_attention(), rec.heads[module.layer_idx][: rec.first_k], rec.kernel)  # (n - w,)
    top = s.float().argsort(descending=True, stable=True)[: rec.budget - rec.window].sort().values
    return torch.cat([top, torch.arange(n - rec.window, n, device=k.device)])


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def probing(model: nn.Module, rec: _Recorder) -> Iterator[None]:
    """Run ``model`` with the probing attention function (any Llama / Mistral / Qwen2 / Qwen3 of transformers)."""
    AttentionInterface.register(ATTN_NAME, _attention)
    try:
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(ATTN_NAME, _no_mask)
    except ImportError:
        pass
    saved = model.config._attn_implementation
    mods = attention_modules(model)
    model.config._attn_implementation = ATTN_NAME
    for m in mods:
        m._kvbench_calibration = rec
    try:
        yield
    finally:
        model.config._attn_implementation = saved
        for m in mods:
            m.__dict__.pop("_kvbench_calibration", None)


def _step(model: nn.Module, ids: list[int], cache: Any) -> tuple[Tensor, Any]:
    """One forward over the transformers cache (``cache`` in transformers >= 5.2x, ``past_key_values`` before)."""
    device = next(model.parameters()).device
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1, **{name: cache})
    new = getattr(out, "cache", None)
    return out.logits[0, -1], new if new is not None else out.past_key_values


# ---------------------------------------------------------------------------------------------------------------
# the two calibrations
# ---------------------------------------------------------------------------------------------------------------
def shape(model: nn.Module) -> tuple[int, int]:
    cfg = model.config.get_text_config()
    return cfg.num_hidden_layers, cfg.num_attention_heads


@torch.inference_mode()
def retrieval_heads(model: nn.Module, probes: list[Probe], reader: Reader, max_new_tokens: int = 8,
                    min_recall: float | None = 0.5) -> dict[str, Any]:
    """Semantic retrieval heads (module docstring): ranking per layer, mean scores, counts."""
    n_layers, n_heads = shape(model)
    per_test: list[Tensor] = []
    skipped = 0
    rec = _Recorder(mode="srh")
    with probing(model, rec):
        for p in probes:
            if p.span is None or p.span[1] >= len(p.ids):
                skipped += 1
                continue
            rec.span = p.span
            logits, cache = _step(model, p.ids[:-1], None)
            logits, cache = _step(model, p.ids[-1:], cache)
            score, span_ids, gen = torch.zeros(n_layers, n_heads), p.ids[p.span[0] : p.span[1]], []
            for _ in range(max_new_tokens):
                t = int(logits.argmax())
                gen.append(t)
                hits = span_ids.count(t)
                if hits:
                    score += hits * torch.stack([rec.mass[i].cpu() for i in range(n_layers)])
                if reader.stop(gen) or t == reader.eos or len(gen) == max_new_tokens:
                    break
                logits, cache = _step(model, [t], cache)
            if min_recall is None or rouge1_recall(p.reference, reader.units(gen)) > min_recall:
                per_test.append(score)
    if not per_test:
        raise UsageError(f"no needle was retrieved (ROUGE-1 recall > {min_recall}) in {len(probes)} tests, so no "
                         "head can be ranked: use longer/more tests, or count every test (--count-all) for an "
                         "untrained model")
    mean = torch.stack(per_test).mean(0)  # (L, H_q)
    ranking = [sorted(range(n_heads), key=lambda h, r=row: (-float(r[h]), h)) for row in mean]
    return {"ranking": ranking, "scores": [[_num(x) for x in row.tolist()] for row in mean],
            "n_tests": len(probes), "n_counted": len(per_test), "n_skipped": skipped}


@torch.inference_mode()
def layer_errors(model: nn.Module, probes: list[Probe], ranking: list[list[int]], reader: Reader, steps: int = 8,
                 budget: int = 32, window: int = 8, first_k: int = 4, kernel: int = 5) -> dict[str, Any]:
    """Layer error scores u (module docstring): normalised per group, averaged over groups, normalised again."""
    n_layers, _ = shape(model)
    if budget <= window:
        raise UsageError(f"the simulated budget ({budget}) must exceed the window ({window})")
    sums: dict[str, Tensor] = {}
    rec = _Recorder(mode="error", heads=ranking, first_k=first_k, window=window, kernel=kernel, budget=budget)
    with probing(model, rec):
        for p in probes:
            rec.errors, rec.kept = {}, {}
            logits, cache = _step(model, p.ids, None)
            for _ in range(steps):
                t = int(logits.argmax())
                if t == reader.eos:
                    break
                logits, cache = _step(model, [t], cache)
            err = torch.tensor([rec.errors.get(i, 0.0) for i in range(n_layers)], dtype=torch.float64)
            sums[p.group] = sums.get(p.group, torch.zeros(n_layers, dtype=torch.float64)) + err
    per_group = {g: s / s.sum() if s.sum() > 0 else s for g, s in sums.items()}
    avg = torch.stack(list(per_group.values())).mean(0)
    u = avg / (avg.sum() + 1e-12)
    return {"scores": [_num(x) for x in u.tolist()],
            "per_group": {g: [_num(x) for x in s.tolist()] for g, s in per_group.items()}}


def _num(x: float) -> float:
    return float(f"{x:.6g}")


# ---------------------------------------------------------------------------------------------------------------
# the file
# ---------------------------------------------------------------------------------------------------------------
def model_info(model: nn.Module, name: str, pretrained: str | None = None, revision: str | None = None,
               local_dir: str | None = None) -> dict[str, Any]:
    """What identifies the calibrated model: name, source, revision, commit, shape, and local weights' sha256."""
    cfg = model.config.get_text_config()
    info: dict[str, Any] = {"name": name, "pretrained": pretrained, "revision": revision,
                            "commit": getattr(model.config, "_commit_hash", None), "model_type": cfg.model_type,
                            "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
                            "n_kv_heads": cfg.num_key_value_heads}
    if local_dir and Path(local_dir).is_dir():
        info["weights_sha256"] = {p.name: sha256_file(p)
                                  for p in sorted(Path(local_dir).glob("*.safetensors"))}
    return info


def dumps(data: dict[str, Any]) -> str:
    """JSON with one line per second-level key (readable diffs, short files)."""
    def block(v: Any) -> str:
        if not isinstance(v, dict) or not v:
            return json.dumps(v)
        return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(x)}" for k, x in v.items()) + "\n }"

    return "{\n" + ",\n".join(f" {json.dumps(k)}: {block(v)}" for k, v in data.items()) + "\n}\n"


def record(model: dict[str, Any], srh: dict[str, Any], errors: dict[str, Any], settings: dict[str, Any]) -> dict:
    """The calibration file's content (deterministic: no dates, no absolute paths)."""
    return {"format": FORMAT, "version": VERSION, "model": model,
            "srh": srh, "layer_error": errors, "settings": settings,
            "note": "generated by scripts/calibrate_compresskv.py on kvbench-generated data with seeds the "
                    "evaluation tasks do not use (held out); see kvbench/calibration/compresskv.py"}

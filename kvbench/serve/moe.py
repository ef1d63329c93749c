"""MoE routing traces recorded from the router modules of tiny random MoE models built from transformers configs.

Mixtral, Qwen2-MoE and OLMoE (transformers 5.x, offline, random weights): a forward hook on every ``*Router``
module records its third output, the chosen expert ids of each token row (nextwave.md §4), during ``generate``:
the prompt's rows at prefill, one row per sequence at each decode step. Prompts are drawn from a Zipf law over the
vocabulary, so tokens repeat as in text. A trace is ``ids (R, T)`` (the input token of every step) and
``experts (R, T, L, k)`` (the experts every MoE layer chose for it), ``T = prompt + new_tokens - 1``.

Random routers route by what they are given (token and context), not by meaning: real ExpertFlow traces need
real checkpoints on a GPU node (``workload.moe.pretrained=<hub id or dir>``, :func:`pretrained_moe`; not run
here); the hooks and everything after them are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FAMILIES = ("mixtral", "qwen2_moe", "olmoe")


def tiny_moe(family: str, layers: int, experts: int, topk: int, vocab: int = 512, hidden: int = 64,
             seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    base = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    extra = {"mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(num_local_experts=experts)),
             "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                           dict(num_experts=experts, moe_intermediate_size=hidden // 2, decoder_sparse_step=1,
                                shared_expert_intermediate_size=hidden, mlp_only_layers=[])),
             "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM, dict(num_experts=experts))}
    if family not in extra:
        from kvbench.errors import UsageError

        raise UsageError(f"moe family {family!r}; choose one of {', '.join(FAMILIES)}")
    cfg_cls, model_cls, kw = extra[family]
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**base, **kw, num_experts_per_tok=topk)).eval()


def pretrained_moe(path: str, device: str = "auto") -> torch.nn.Module:
    """A real MoE checkpoint (hub id or local directory; on a GPU node), bf16 on CUDA when present. Not run here."""
    from transformers import AutoModelForCausalLM

    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    mods = [m for m in model.modules() if type(m).__name__.endswith("Router")]
    if not mods:
        raise RuntimeError(f"{type(model).__name__} has no *Router modules (transformers >= 5 routers are needed)")
    return mods


@dataclass
class Trace:
    ids: np.ndarray  # (R, T) input token of each step
    experts: np.ndarray  # (R, T, L, k) sorted expert ids per layer

    @property
    def layers(self) -> int:
        return self.experts.shape[2]


def zipf_prompts(n: int, length: int, vocab: int, seed: int, a: float = 1.3) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(np.arange(3, vocab))  # which ids are frequent
    ranks = np.minimum(rng.zipf(a, (n, length)) - 1, len(perm) - 1)
    return torch.as_tensor(perm[ranks], dtype=torch.long)


def record(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> Trace:
    """Route ``prompts`` (R, P) and ``new_tokens`` greedy steps through the model, recording every router.
    One intra-op thread (tiny matrices; several threads spin on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _record(model, prompts, new_tokens)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _record(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int) -> Trace:
    rows: list[list[torch.Tensor]] = [[] for _ in routers(model)]
    prompts = prompts.to(next(model.parameters()).device)
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: rows[i].append(out[2].detach().clone()))
             for i, m in enumerate(routers(model))]
    try:
        out = model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             attention_mask=torch.ones_like(prompts))
    finally:
        for h in hooks:
            h.remove()
    r, p = prompts.shape
    prompts = prompts.cpu()
    per_layer = []
    for steps in rows:  # steps[0]: (R * P, k) prefill; steps[1:]: (R, k) per decode step
        pre = steps[0].view(r, p, -1)
        per_layer.append(torch.cat([pre, *[s.view(r, 1, -1) for s in steps[1:]]], 1))  # (R, T, k)
    experts = torch.stack(per_layer, 2).sort(-1).values  # (R, T, L, k)
    ids = out[:, : experts.shape[1]]  # the input token of every step
    return Trace(ids.cpu().numpy(), experts.cpu().numpy())

"""Decode cost per token of kvbench's full cache against transformers' StaticCache (and DynamicCache, for information).

One random Llama-architecture model built from a config (SmolLM2-135M's shape by default: hidden 576, 9 heads,
3 KV heads, head_dim 64, intermediate 1536; ``--layers`` decoder layers, 16K positions), one process, SDPA
everywhere. For every context length the random prompt is prefilled once (untimed, ``Prefilled``) and each
implementation decodes ``--new-tokens`` greedy tokens from that cache, each forward timed alone:

- ``kvbench``: ``Engine`` with ``fullkv`` (budget 1.0): the cache kvbench measures every method on;
- ``static``: ``StaticCache`` preallocated to context + new tokens and written in place (the reference);
- ``dynamic``: ``DynamicCache`` (concatenates every token, like kvbench's store before issue 10).

Repetitions are interleaved (every repetition runs every length and implementation, in a rotating order), so load
on a shared machine hits all of them alike. Each forward is timed on two clocks: wall time, and the process's CPU
time (on an oversubscribed machine the latter leaves out the time spent waiting for a core). Per run the per-token
time is the median over its decode steps; the tables give the median over repetitions and the spread (min-max over
repetitions), the mean over all steps (which includes kvbench's occasional buffer growth), and the ratios kvbench /
static at each length and of the growth from the shortest to the longest length. It also checks that the three
produce the same greedy tokens.

    .venv/bin/python scripts/decode_bench.py                        # 1K 2K 4K 8K, 3 repetitions, 1 thread
    .venv/bin/python scripts/decode_bench.py --contexts 1024,8192 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from kvbench.budget import Uniform
from kvbench.engine import Engine
from methods.fullkv import FullKV

IMPLS = ("kvbench", "static", "dynamic")
CACHE_KWARG = "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"


def build_model(layers: int, kv_heads: int, dtype: torch.dtype) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=2048, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=kv_heads, head_dim=64, max_position_embeddings=16384, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype).eval()


Times = dict[str, list[float]]  # clock ("wall" or "cpu") -> seconds of each decode forward
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed_steps(step: Callable[[int], torch.Tensor], first: torch.Tensor, n: int) -> tuple[list[int], Times]:
    """Greedy decoding of n tokens from the prompt's last logits; the wall and CPU seconds of each forward."""
    tokens, logits = [], first
    times: Times = {c: [] for c in CLOCKS}
    for _ in range(n):
        tokens.append(int(logits.argmax()))
        t0, c0 = time.perf_counter(), time.process_time()
        logits = step(tokens[-1])
        times["wall"].append(time.perf_counter() - t0)
        times["cpu"].append(time.process_time() - c0)
    return tokens, times


class Prefilled:
    """One prompt prefilled once by kvbench's engine; every implementation decodes from the same cache contents.

    transformers' caches are filled with the engine's post-RoPE keys and values through ``Cache.update`` (what the
    model's own prefill would store), so a repetition costs one prefill instead of three; the greedy tokens of the
    three implementations are compared to check that nothing differs."""

    def __init__(self, model: LlamaForCausalLM, ids: torch.Tensor, n_new: int) -> None:
        self.model, self.n, self.n_new = model, ids.numel(), n_new
        self.engine = Engine(model, FullKV(), Uniform(), budget=1.0, backend="sdpa")
        with torch.inference_mode(), self.engine as eng:
            eng.reset()
            self.first = eng.forward(ids)
            self.kv = [tuple(t.clone()[None] for t in layer.dense()) for layer in eng.store.layers]  # (1, H, n, d)

    @torch.inference_mode()
    def decode(self, impl: str) -> tuple[list[int], Times]:
        if impl == "kvbench":
            with self.engine as eng:
                return timed_steps(lambda tok: eng.forward([tok]), self.first, self.n_new)
        cache = (StaticCache(config=self.model.config, max_cache_len=self.n + self.n_new + 1) if impl == "static"
                 else DynamicCache(config=self.model.config))
        for i, (k, v) in enumerate(self.kv):
            cache.update(k.clone(), v.clone(), i, {"cache_position": torch.arange(self.n)})
        kw = {CACHE_KWARG: cache, "use_cache": True, "logits_to_keep": 1}

        def step(tok: int) -> torch.Tensor:
            return self.model(input_ids=torch.tensor([[tok]]), **kw).logits[0, -1]

        return timed_steps(step, self.first, self.n_new)


def spread(xs: list[float]) -> str:
    return f"{min(xs) * 1e3:.2f}-{max(xs) * 1e3:.2f}"


def report(medians: dict, means: dict, contexts: list[int], clock: str) -> None:
    """The table for one clock: per length and implementation, ms per token; then the ratios against StaticCache."""
    print(f"\n{clock} time per decoded token")
    print(f"{'context':>8} {'impl':>8} {'median ms':>10} {'spread (reps)':>15} {'mean ms':>9} {'vs static':>10}")
    for c in contexts:
        for impl in IMPLS:
            m, s = statistics.median(medians[clock, impl, c]), statistics.median(medians[clock, "static", c])
            print(f"{c:>8} {impl:>8} {m * 1e3:>10.2f} {spread(medians[clock, impl, c]):>15} "
                  f"{statistics.mean(means[clock, impl, c]) * 1e3:>9.2f} {m / s:>9.2f}x")
    for c in contexts:
        ratios = [a / b for a, b in zip(medians[clock, "kvbench", c], medians[clock, "static", c], strict=True)]
        print(f"kvbench / static at {c}: {statistics.median(ratios):.2f}x (per repetition "
              f"{min(ratios):.2f}-{max(ratios):.2f})")
    lo, hi = contexts[0], contexts[-1]
    growth = {i: statistics.median(medians[clock, i, hi]) / statistics.median(medians[clock, i, lo]) for i in IMPLS}
    print(f"growth {lo} -> {hi}: " + ", ".join(f"{i} {g:.2f}x" for i, g in growth.items())
          + f"; kvbench growth / static growth = {growth['kvbench'] / growth['static']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="1024,2048,4096,8192")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=3, help="9 query heads; 3 = GQA as SmolLM2, 9 = MHA")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    model = build_model(args.layers, args.kv_heads, getattr(torch, args.dtype))
    prompts = {c: torch.randint(0, 2048, (c,), generator=torch.Generator().manual_seed(c)) for c in contexts}
    medians: dict[tuple[str, str, int], list[float]] = defaultdict(list)  # (clock, impl, context) -> per repetition
    means: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    agree: dict[str, list[bool]] = defaultdict(list)
    warm = Prefilled(model, prompts[contexts[0]][:128], 2)  # first-call overheads
    for impl in IMPLS:
        warm.decode(impl)
    for rep in range(args.repeats):
        for c in contexts:
            order = IMPLS[rep % 3:] + IMPLS[: rep % 3]
            tokens, cache = {}, Prefilled(model, prompts[c], args.new_tokens)
            for impl in order:
                tokens[impl], times = cache.decode(impl)
                for clock, ts in times.items():
                    medians[clock, impl, c].append(statistics.median(ts))
                    means[clock, impl, c].append(statistics.mean(ts))
                print(f"rep {rep} context {c:>6} {impl:>8}: {medians['wall', impl, c][-1] * 1e3:.2f} ms/token wall, "
                      f"{medians['cpu', impl, c][-1] * 1e3:.2f} CPU", flush=True)
            for impl in ("kvbench", "dynamic"):
                agree[impl].append(tokens[impl] == tokens["static"])
    print(f"\n{args.layers} layers, 9 heads / {args.kv_heads} KV heads, head_dim 64, {args.dtype}, sdpa, "
          f"{args.threads} thread(s), {args.new_tokens} new tokens, {args.repeats} interleaved repetitions, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    for clock in CLOCKS:
        report(medians, means, contexts, clock)
    print("\nsame greedy tokens as static: " + ", ".join(f"{i} {all(agree[i])}" for i in ("kvbench", "dynamic")))


if __name__ == "__main__":
    main()

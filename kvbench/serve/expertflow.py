"""ExpertFlow (He et al., arXiv 2410.17954): MoE expert offloading with routing-path prediction.

No authors' code is public (methods_more §7.4); the mechanisms of the abstract, on recorded routing traces
(:mod:`kvbench.serve.moe`):

* a routing-path predictor trained on traces, run before computation: :class:`TablePredictor` predicts each
  layer's top-k experts of a token from (layer, input token) counts of the training traces, falling back to the
  layer's most used experts (a deviation: the paper's predictor is a small transformer);
* token scheduling: requests are regrouped into batches by the similarity of their predicted expert usage, so a
  batch needs fewer distinct experts (:func:`schedule_by_route`);
* a predictive expert cache: ``capacity`` experts per layer on the device; before each iteration the predicted
  experts are prefetched on the copy stream while the previous iteration computes, and mispredictions are
  corrected at run time by synchronous loads. Baselines: the same cache filled on demand with LRU or LFU eviction.

Costs (Mixtral-8x7B on the chosen hardware): an iteration is the dense part of the cost model plus, per layer and
distinct expert used, ``max(expert_bytes / weight_bw, 2 * expert_params * tokens / gemm_flops)``; a load is
``expert_bytes / pcie_bw``. Requests are served in static batches of ``batch`` (prefill, then decode steps).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import simpy

from kvbench.errors import UsageError
from kvbench.serve.cost import Batch, CostModel
from kvbench.serve.moe import Trace, pretrained_moe, record, tiny_moe, zipf_prompts
from kvbench.serve.system import SimContext, SimResult, System


class TablePredictor:
    """Experts per (layer, token) from training counts; the layer's most used experts for unseen tokens."""

    def __init__(self, trace: Trace) -> None:
        _, _, self.layers, self.k = trace.experts.shape
        self.table: dict[tuple[int, int], Counter] = {}
        self.fallback = [Counter() for _ in range(self.layers)]
        for tok, ex in zip(trace.ids.reshape(-1), trace.experts.reshape(-1, self.layers, self.k), strict=True):
            for layer in range(self.layers):
                self.table.setdefault((layer, int(tok)), Counter()).update(ex[layer].tolist())
                self.fallback[layer].update(ex[layer].tolist())

    def predict(self, token: int, layer: int) -> frozenset[int]:
        counts = self.table.get((layer, token)) or self.fallback[layer]
        return frozenset(e for e, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: self.k])

    def accuracy(self, trace: Trace) -> float:
        """Mean share of each token's true top-k experts predicted, over tokens and layers."""
        hits = [len(self.predict(int(t), layer) & set(ex[layer].tolist())) / self.k
                for t, ex in zip(trace.ids.reshape(-1), trace.experts.reshape(-1, self.layers, self.k), strict=True)
                for layer in range(self.layers)]
        return float(np.mean(hits))


TRACES: dict[tuple, tuple[Trace, Trace]] = {}  # recorded once per process and setting (baselines share them)
Needs = list[list[set[int]]]  # per iteration, per layer: the experts used


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0  # loaded synchronously when needed
    prefetched: int = 0  # loaded ahead (predictive)
    per_iter: list[tuple[int, int]] = field(default_factory=list)  # (sync loads, prefetches) per iteration


def simulate_cache(needs: Needs, capacity: int, policy: str, predicted: Needs | None = None) -> CacheStats:
    """Per layer a cache of ``capacity`` experts. ``lru`` / ``lfu``: loaded on demand. ``predictive``: the
    predicted experts of an iteration are loaded before it (evicting the least recently used unpredicted ones);
    a needed expert that is not resident is a miss, loaded at once (runtime correction)."""
    if policy not in ("lru", "lfu", "predictive"):
        raise UsageError(f"cache policy {policy!r}; choose lru, lfu or predictive")
    layers = len(needs[0]) if needs else 0
    caches: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(layers)]
    freq = [Counter() for _ in range(layers)]
    st = CacheStats()

    def admit(layer: int, e: int, keep: set[int]) -> None:
        c = caches[layer]
        if len(c) >= capacity:
            victims = [x for x in c if x not in keep] or list(c)
            victim = min(victims, key=lambda x: freq[layer][x]) if policy == "lfu" else victims[0]
            del c[victim]
        c[e] = None

    for it, layer_needs in enumerate(needs):
        sync = pre = 0
        for layer, used in enumerate(layer_needs):
            c = caches[layer]
            if policy == "predictive" and predicted is not None:
                want = set(sorted(predicted[it][layer])[:capacity])
                for e in sorted(want - set(c)):
                    admit(layer, e, want)
                    pre += 1
            for e in sorted(used):
                freq[layer][e] += 1
                if e in c:
                    st.hits += 1
                    c.move_to_end(e)
                else:
                    st.misses += 1
                    sync += 1
                    admit(layer, e, set(used))
        st.prefetched += pre
        st.per_iter.append((sync, pre))
    return st


def schedule_by_route(usage: np.ndarray, batch: int) -> list[list[int]]:
    """Greedy regrouping: the first unassigned request with the ``batch - 1`` unassigned ones whose predicted
    expert usage (rows of ``usage``, L2-normalised) is most similar."""
    u = usage / np.maximum(np.linalg.norm(usage, axis=1, keepdims=True), 1e-12)
    left = list(range(len(u)))
    groups = []
    while left:
        head, rest = left[0], left[1:]
        sims = u[rest] @ u[head]
        pick = [rest[i] for i in np.argsort(-sims, kind="stable")[: batch - 1]]
        groups.append([head, *pick])
        left = [i for i in rest if i not in set(pick)]
    return groups


@dataclass
class ExpertFlow(System):
    name: str = "expertflow"
    headline: ClassVar[tuple[str, ...]] = ("hit_ratio", "tokens_per_s", "bytes_to_device", "distinct_experts_per_layer")
    capacity: int = 4  # experts per layer held on the device
    batch: int = 8
    policy: str = "predictive"  # predictive | lru | lfu
    token_scheduling: bool = True

    def traces(self, ctx: SimContext) -> tuple[Trace, Trace]:
        """(train, test) traces from the workload's tiny MoE (the arch's layers, experts and top-k): the first
        ``n_requests`` prompts train the predictor, the next ``n_requests`` are served."""
        w, a = ctx.workload.moe, ctx.arch
        if not a.experts:
            raise UsageError(f"system=expertflow needs an MoE arch (experts > 0), got {a.name}")
        key = (w.family, w.get("layers") or a.layers, a.experts, a.topk, w.vocab, w.hidden, w.prompt, w.output,
               ctx.workload.n_requests, ctx.seed, w.get("pretrained"))
        if key not in TRACES:
            family, layers, experts, topk, vocab, hidden, prompt, output, n, seed, path = key
            model = pretrained_moe(path) if path else tiny_moe(family, layers, experts, topk, vocab, hidden, seed)
            full = record(model, zipf_prompts(2 * n, prompt, vocab, seed), output)
            TRACES[key] = (Trace(full.ids[:n], full.experts[:n]), Trace(full.ids[n:], full.experts[n:]))
        return TRACES[key]

    def needs(self, trace: Trace, groups: list[list[int]], predictor: TablePredictor | None,
              prompt: int) -> tuple[Needs, Needs, list[Batch], list[list[Counter]]]:
        """Per iteration of every batch (prefill, then each decode step): experts used, predicted, the batch's
        shape for the dense cost, and tokens per expert."""
        used, pred, shapes, loads = [], [], [], []
        steps = [slice(0, prompt)] + [slice(t, t + 1) for t in range(prompt, trace.ids.shape[1])]
        for g in groups:
            for k, sl in enumerate(steps):
                ex = trace.experts[g, sl]  # (B, q, L, k)
                toks = trace.ids[g, sl].reshape(-1)
                layers = range(trace.layers)
                used.append([set(ex[:, :, layer].reshape(-1).tolist()) for layer in layers])
                loads.append([Counter(ex[:, :, layer].reshape(-1).tolist()) for layer in layers])
                pred.append([set().union(*(predictor.predict(int(t), layer) for t in toks)) if predictor else set()
                             for layer in layers])
                q = sl.stop - sl.start
                shapes.append(Batch(prefill=[(q, 0)] * len(g)) if k == 0 else Batch(decode=[prompt + k] * len(g)))
        return used, pred, shapes, loads

    def simulate(self, requests: Any, ctx: SimContext) -> SimResult:
        train, test = self.traces(ctx)
        predictor = TablePredictor(train)
        return self.run_traces(test, predictor, ctx)

    def run_traces(self, test: Trace, predictor: TablePredictor, ctx: SimContext) -> SimResult:
        prompt = ctx.workload.moe.prompt
        if self.token_scheduling:
            usage = np.zeros((test.ids.shape[0], test.layers * ctx.arch.experts))
            for r in range(test.ids.shape[0]):
                for t in test.ids[r, :prompt]:
                    for layer in range(test.layers):
                        for e in predictor.predict(int(t), layer):
                            usage[r, layer * ctx.arch.experts + e] += 1
            groups = schedule_by_route(usage, self.batch)
        else:
            groups = [list(range(i, min(i + self.batch, test.ids.shape[0])))
                      for i in range(0, test.ids.shape[0], self.batch)]
        used, pred, shapes, loads = self.needs(test, groups, predictor if self.policy == "predictive" else None,
                                               prompt)
        stats = simulate_cache(used, self.capacity, self.policy, pred if self.policy == "predictive" else None)
        total_s, stall_s = self.timeline(ctx, shapes, loads, stats)
        a = ctx.arch
        tokens = sum(b.tokens for b in shapes)
        distinct = float(np.mean([sum(len(x) for x in u) / len(u) for u in used]))
        m = {"hit_ratio": stats.hits / max(stats.hits + stats.misses, 1), "misses": stats.misses,
             "prefetched": stats.prefetched, "bytes_to_device": (stats.misses + stats.prefetched) * a.expert_bytes,
             "expert_mem_bytes": self.capacity * test.layers * a.expert_bytes,
             "all_experts_bytes": a.experts * test.layers * a.expert_bytes, "tokens": tokens, "time_s": total_s,
             "tokens_per_s": tokens / total_s, "load_stall_s": stall_s, "distinct_experts_per_layer": distinct,
             "predictor_accuracy": predictor.accuracy(test), "batches": len(groups)}
        return SimResult(m)

    def timeline(self, ctx: SimContext, shapes: list[Batch], loads: list[list[Counter]],
                 stats: CacheStats) -> tuple[float, float]:
        """simpy timeline: each iteration waits for its synchronous loads; its prefetches ran on the copy stream
        during the previous iteration (only the excess over that iteration stalls)."""
        a, hw = ctx.arch, ctx.hw
        dense = CostModel(replace(a, experts=0, intermediate=0), hw)  # attention + projections, no MLP
        env = simpy.Environment()
        stall = [0.0]
        load_s = a.expert_bytes / hw.pcie_bw

        def expert_s(tokens: int) -> float:
            return max(a.expert_bytes / hw.weight_bw, 2 * a.expert_params * tokens / hw.gemm_flops)

        def loop() -> Any:
            prev = 0.0
            for shape, per_layer, (sync, pre) in zip(shapes, loads, stats.per_iter, strict=True):
                compute = dense.iteration_s(shape) + sum(expert_s(n) for c in per_layer for n in c.values())
                wait = sync * load_s + max(pre * load_s - prev, 0.0)
                stall[0] += wait
                yield env.timeout(compute + wait)
                prev = compute

        env.process(loop())
        env.run()
        return env.now, stall[0]

    def baselines(self) -> dict[str, System]:
        if self.policy != "predictive":
            return {}
        return {"lru": replace(self, name="lru", policy="lru", token_scheduling=False),
                "lfu": replace(self, name="lfu", policy="lfu", token_scheduling=False),
                "predictive_no_scheduling": replace(self, name="predictive_no_scheduling", token_scheduling=False)}

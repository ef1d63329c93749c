"""EpiCache: episodic KV caches for long conversations (block-wise prefill, one compressed cache per episode)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from kvbench.budget import tokens_per_head
from kvbench.engine.context import LayerContext
from kvbench.engine.store import LayerKV
from kvbench.errors import UsageError
from kvbench.method import Method
from kvbench.ops import Workspace

INSTRUCTION = ("Extract the essential information of this conversation: speakers, personas, dated events, personal "
               "details, commitments, opinions, relationships and emotional moments.")


@dataclass
class Episode:
    """One conversation episode: its centroid and the probe that scores tokens for its cache."""

    centroid: np.ndarray  # the k-means centre of the episode's normalised window embeddings
    probe_ids: list[int]
    windows: list[int]  # indices of the medoid utterance windows, chronological


@dataclass
class EpiCache(Method):
    """EpiCache (https://arxiv.org/abs/2509.17396, apple/ml-epicache), methods_more §3.

    Offline, per conversation: the turns (``Sample.meta["turns"]``) are cut into windows of ``conv_window``
    utterances, embedded, and clustered into ``n_episodes`` episodes with k-means (random_state 42, n_init 10, on
    L2-normalised embeddings); each episode's ``n_medoids`` windows closest (cosine) to its centroid, in
    chronological order, form its patched prompt. Per episode, the conversation is prefilled in blocks of ``block``
    tokens; after each block a probe [instruction + patched prompt], placed after the block and not stored, scores
    every cached token by the max over probe queries and each KV head's query group of its attention (softmax over
    the cached keys only), and each layer keeps M_l tokens per KV head: ``level=pair`` takes one top-(M_l * H) over
    the layer's heads (the ``flat`` allocator; heads get different lengths), ``pair-uniform`` top-M_l per head
    (``allocator=uniform``). The first ``sink`` tokens are never evicted (EpiCache never evicts its system prompt).
    Each question is embedded the same way and routed to the episode whose k-means centre has the largest dot
    product with it (the centres are not re-normalised, as in the authors' ``create_question_cluster_mappings``),
    answered over that episode's cache, and rolled back.

    Layer budgets: M = the run's budget in tokens per head of the conversation; a sensitivity profile compares the
    key caches of a full causal pass and a block-masked pass (``profile_block`` blocks, ``profile_sink`` sink tokens,
    50 % overlap with the previous block) on a held-out synthetic text (seeded apart from every task); s_l = mean
    cosine over heads and 100-token windows; w_l = (1 - (s_l - min s) / (max s - min s))^alpha;
    M_l = floor(M * L * w_l / sum w), at least max(1, M // 4). alpha = 1.1 (the authors' Llama value; 1.3 for
    Qwen2.5; 0 = uniform). The real average budget is the kept fraction each run reports.

    Embedder: ``llm`` mean-pools the evaluated model's input embeddings (the authors' ``llm`` option; works
    offline); a path to a local sentence-transformers model uses that model (the authors' default is
    Qwen3-Embedding-0.6B; all-MiniLM-L6-v2 in their README).

    Deviations: the profile text is a generated haystack (``profile_tokens`` tokens, default 8192 with 2048-token
    blocks and 64 sinks, half the authors' BookSum setting, so it runs on CPU) instead of a BookSum sample; no chat
    postfix between instruction and patched prompt; utterance windows are rendered with the task's
    ``meta["turn_format"]`` when it has one (EpiCache: ``Speaker said, "text"``), so the probe matches the context.
    """

    name: str = "epicache"
    window: int = 0
    n_episodes: int = 4
    n_medoids: int = 8
    conv_window: int = 4
    embedder: str = "llm"
    block: int = 2048
    sink: int = 4
    alpha: float = 1.1
    instruction: str = INSTRUCTION
    profile_tokens: int = 8192
    profile_block: int = 2048
    profile_sink: int = 64
    profile_seed: int = 90210
    _profiles: dict[int, list[float]] = field(default_factory=dict, repr=False)
    _st_model: Any = field(default=None, repr=False)
    _work: Workspace = field(default_factory=Workspace, repr=False, compare=False)

    episodic: ClassVar[bool] = True
    shares_prefill: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("n_episodes", "n_medoids", "conv_window", "block"):
            if int(getattr(self, key)) < 1:
                raise UsageError(f"method.{key} must be >= 1, got {getattr(self, key)!r}")
        if self.alpha < 0 or self.sink < 0:
            raise UsageError("method.alpha and method.sink must be >= 0")

    def score(self, ctx: LayerContext) -> Tensor:
        raise UsageError("epicache compresses block-wise with episode probes; it runs with protocol=query_agnostic")

    # -- scoring with a probe -------------------------------------------------------------------------------------
    def probe_scores(self, queries: Tensor, layer: LayerKV, scale: float) -> Tensor:
        """(H, max len_h) scores, -inf past each head's end: per KV head, the max over the probe's queries and the
        head's query group of the attention each cached key receives (softmax in fp32 over that head's keys).

        The logits of a head are one (G * p, d) x (d, len_h) matmul written, with the probabilities, into two
        workspace buffers that live across layers and probes (``kvbench.ops.Workspace``): the same values, bit for
        bit, as the einsum-then-softmax of the reference in tests/test_fast_scoring.py."""
        h, queries = layer.n_heads, queries.detach()  # out= buffers need no autograd
        g, p, d = queries.shape[0] // h, queries.shape[1], queries.shape[2]
        out = torch.full((h, int(layer.lens.max())), float("-inf"), device=queries.device)
        for k in range(h):
            keys = layer.head(k)[0].float()  # (len_k, d)
            q = queries[k * g : (k + 1) * g].float().reshape(g * p, d)  # (G * p, d)
            shape = (g * p, keys.shape[0])
            logits = torch.mm(q, keys.T, out=self._work.get("logits", shape, q.device)).mul_(scale)  # (G * p, len_k)
            probs = torch.softmax(logits, -1, out=self._work.get("probs", shape, q.device))
            s = probs.amax(0)  # (len_k,): max over the probe's queries and the group
            s[: self.sink] = float("inf")
            out[k, : len(s)] = s
        return out

    # -- episodes -------------------------------------------------------------------------------------------------
    def windows(self, sample: Any) -> list[str]:
        """The context's utterance windows: ``conv_window`` turns each (``Sample.meta["turns"]``); a context
        without turns is cut into its lines, or its sentences when it is one line (a generalisation: EpiCache
        itself only runs on conversations)."""
        units = utterances(sample)
        if not units:
            raise UsageError(f"epicache found nothing to cluster in sample {sample.id!r} (no turns, lines or "
                             "sentences)")
        return ["\n".join(units[i : i + self.conv_window]) for i in range(0, len(units), self.conv_window)]

    def embed(self, texts: list[str], model: nn.Module, tok: Any) -> np.ndarray:
        """(len(texts), dim) L2-normalised embeddings."""
        if self.embedder == "llm":
            table = model.get_input_embeddings().weight.detach().float()
            vecs = [table[torch.as_tensor(tok(t).input_ids or [0])].mean(0) for t in texts]  # as the authors: BOS in
            emb = torch.stack(vecs).cpu().numpy()
        else:
            emb = np.asarray(self._sentence_model().encode(texts), dtype=np.float64)
        return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def _sentence_model(self) -> Any:
        if self._st_model is None:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as err:
                raise UsageError(f"embedder={self.embedder!r} needs sentence-transformers "
                                 "(pip install -c constraints.txt sentence-transformers), or use embedder=llm") from err
            try:
                self._st_model = SentenceTransformer(self.embedder, local_files_only=True)
            except Exception as err:  # noqa: BLE001 - any load failure is one clear message
                raise UsageError(f"could not load the sentence-transformers model {self.embedder!r} from a local "
                                 f"path or cache ({err}); download it on a machine with network, or embedder=llm") \
                    from err
        return self._st_model

    def episodes(self, sample: Any, model: nn.Module, tok: Any) -> list[Episode]:
        """Cluster the conversation's utterance windows into episodes with their probes."""
        from sklearn.cluster import KMeans

        texts = self.windows(sample)
        emb = self.embed(texts, model, tok)
        k = min(self.n_episodes, len(texts))
        km = KMeans(n_clusters=k, random_state=42, n_init=10).fit(emb)
        out = []
        for e in range(k):
            centroid = km.cluster_centers_[e]  # not re-normalised: routing is a dot product with it, as the authors'
            members = np.where(km.labels_ == e)[0]
            cosine = emb[members] @ (centroid / max(np.linalg.norm(centroid), 1e-12))
            best = members[np.argsort(-cosine, kind="stable")[: self.n_medoids]]
            chosen = sorted(best.tolist())
            patched = "\n".join(texts[i] for i in chosen)
            ids = tok(self.instruction + "\n" + patched, add_special_tokens=False).input_ids
            out.append(Episode(centroid, ids, chosen))
        return out

    def route(self, question: str, episodes: list[Episode], model: nn.Module, tok: Any) -> int:
        q = self.embed([question], model, tok)[0]
        return int(np.argmax([q @ e.centroid for e in episodes]))

    # -- layer budgets from sensitivity -------------------------------------------------------------------------------
    def layer_budgets(self, engine: Any, tok: Any, n: int) -> list[int]:
        """Tokens per KV head for every layer, for a context of n tokens (the model's profile is computed once)."""
        key = id(engine.model)
        if key not in self._profiles:
            ids = profile_ids(tok, self.profile_tokens, self.profile_seed)
            self._profiles[key] = sensitivity_profile(engine, ids, self.profile_block, self.profile_sink)
        return self.layer_keep(engine.budget, n, self._profiles[key])

    def layer_keep(self, budget: float, n: int, sensitivity: list[float]) -> list[int]:
        """M_l for every layer: the sensitivity split of M = tokens_per_head(budget, n), floored at max(1, M // 4)."""
        m = tokens_per_head(budget, n)
        s = np.asarray(sensitivity, dtype=float)
        span = s.max() - s.min()
        scaled = (s - s.min()) / span if span > 0 else np.zeros_like(s)
        w = (1.0 - scaled) ** self.alpha if self.alpha > 0 else np.ones_like(s)
        if w.sum() <= 0:
            w = np.ones_like(s)
        keep = np.floor(m * len(s) * w / w.sum()).astype(int)
        return np.maximum(keep, max(1, m // 4)).tolist()


def utterances(sample: Any) -> list[str]:
    """Turns rendered with the task's ``meta["turn_format"]`` (EpiCache: ``Speaker said, "text"``), else lines,
    else sentences (split after " . " or ". ")."""
    turns = sample.meta.get("turns")
    if turns:
        fmt = sample.meta.get("turn_format", '{speaker} said, "{text}"')
        return [fmt.format(speaker=t["speaker"], text=t["text"]) for t in turns]
    lines = [ln for ln in sample.context.splitlines() if ln.strip()]
    if len(lines) > 1:
        return lines
    return [s.strip() for s in re.split(r"(?<=\.)\s+", sample.context) if s.strip()]


def block_mask(n: int, block: int, sink: int, device: torch.device | None = None) -> Tensor:
    """(n, n) bool: query i sees keys j <= i that are sinks (j < sink) or lie in its block or the previous half
    block (EpiCache's profile mask: 50 % overlap)."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    start = (i // block) * block - block // 2
    return (j <= i) & ((j < sink) | (j >= start))


def cosine_by_window(a: Tensor, b: Tensor, size: int = 100) -> float:
    """Mean cosine between a and b (H, n, d) over heads and ``size``-token windows (flattened)."""
    h, n, _ = a.shape
    sims = []
    for s in range(0, n, size):
        x, y = a[:, s : s + size].reshape(h, -1).float(), b[:, s : s + size].reshape(h, -1).float()
        sims.append(torch.nn.functional.cosine_similarity(x, y, dim=-1))  # (H,)
    return float(torch.stack(sims).mean())


def _layer_keys(store: Any) -> list[Tensor]:
    return [ly.dense()[0] for ly in store.layers]


def sensitivity_profile(engine: Any, ids: list[int], block: int, sink: int) -> list[float]:
    """Per-layer s_l: key-cache cosine between a full causal pass and a block-masked pass over ``ids``."""
    engine.reset()
    engine.forward(ids)
    full = _layer_keys(engine.store)
    engine.reset()
    engine.attention_mask = block_mask(len(ids), block, sink, engine.device)
    try:
        engine.forward(ids)
    finally:
        engine.attention_mask = None
    masked = _layer_keys(engine.store)
    engine.reset()
    return [cosine_by_window(a, b) for a, b in zip(full, masked, strict=True)]


def profile_ids(tok: Any, n: int, seed: int) -> list[int]:
    """A held-out text of n tokens for the profile: the embedded suite's haystack with a seed of its own."""
    from kvbench.tasks.synthetic import make_samples

    text = make_samples(kind="needle", lengths=[max(256, n)], n_samples=1, seed=seed, depths=[0.5])[0].context
    ids = tok(text, add_special_tokens=True).input_ids
    if len(ids) < n:
        ids = (ids * math.ceil(n / len(ids)))[:n]
    return ids[:n]

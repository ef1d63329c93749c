"""What a method sees when it scores one layer's cache: ``LayerContext``.

New inputs become new fields here, never new arguments in every method's ``score()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kvbench.ops import group_reduce

COLSUM_BLOCK = 64  # attention_column_sums pads each chunk's keys to a multiple of this (see there)


@dataclass
class LayerContext:
    """One layer at compression time (batch squeezed; n = tokens in the layer's cache when it is compressed).

    Attributes:
        layer_idx, n_layers: which decoder layer, of how many.
        module: the attention module (``o_proj`` etc. for methods that need weights, e.g. value-norm weighting).
        queries: (H_q, q, d) post-RoPE queries of the forward that just filled the cache (the whole prompt in
            one-shot prefill, so the observation window is ``queries[:, -w:]``).
        keys, values: (H_kv, n, d) the layer's cached keys (post-RoPE, original positions) and values.
        positions: (n,) original RoPE positions of the cached tokens.
        window: effective observation window (always-kept recent tokens), already clamped to the budget.
        keep: average tokens kept per KV head in this run, window included (budget converted to tokens).
        scaling: the attention softmax scale (1/sqrt(d) for these models).
        hidden_states: (q, hidden) the attention module's input for the same forward (post input-norm), or None.
        spans: named token ranges [start, end) in cache coordinates, e.g. {"context": (0, 900), "question": ...};
            vision-language prompts add ``image:<k>`` / ``frame:<k>`` (in order of appearance; ``kvbench.engine.vl``).
        memo: scratch space shared by the method and its allocator for this layer (cached attention etc.).
        stats: per-layer scalars a cross-layer allocator reads after scoring (e.g. CAKE's layer preference).
        pad: (H_kv,) leading padding columns per KV head when the layer's heads hold different lengths (the
            left-padded ragged view of ``kvbench.engine.view``; ``keys``/``values`` are zero there and
            ``positions`` is (H_kv, n) with -1), or None for a uniform layer. Softmaxes over keys must exclude
            the padding (``key_mask``); the engine sets padding scores to -inf before selecting.
        sliding_window: the layer's local attention window (None: global attention).
    """

    layer_idx: int
    n_layers: int
    module: nn.Module
    queries: Tensor
    keys: Tensor
    values: Tensor
    positions: Tensor
    window: int
    keep: int
    scaling: float
    hidden_states: Tensor | None = None
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    pad: Tensor | None = None
    sliding_window: int | None = None

    @property
    def key_mask(self) -> Tensor | None:
        """(H_kv, n) True for real keys, False for padding; None when the layer is uniform (all real)."""
        if self.pad is None:
            return None
        return torch.arange(self.n, device=self.keys.device)[None, :] >= self.pad[:, None].to(self.keys.device)

    @property
    def n(self) -> int:
        return self.keys.shape[1]

    @property
    def n_kv_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def n_groups(self) -> int:
        return self.queries.shape[0] // self.keys.shape[0]

    def group(self, x: Tensor, how: str = "mean") -> Tensor:
        """(H_q, ...) -> (H_kv, ...) over each KV head's query group."""
        return group_reduce(x, self.n_kv_heads, how)

    def window_attention(self, w: int | None = None) -> Tensor:
        """Observation-window attention probabilities over the non-window keys: (H_q, w, n - w).

        As in SnapKV and its descendants (methods_core §1.1): the last w queries (true positions) against all n
        keys, causal mask only inside the last w x w block, softmax over all n keys in fp32, cast back to the
        model dtype, then the window columns dropped (so rows sum to < 1).
        """
        w = self.window if w is None else w
        key = f"window_attention:{w}"
        if key not in self.memo:
            self.memo[key] = self._window_attention(w)
        return self.memo[key]

    def _window_attention(self, w: int) -> Tensor:
        q = self.queries[:, -w:].float().reshape(self.n_kv_heads, self.n_groups * w, -1)  # (H_kv, G * w, d)
        logits = torch.bmm(q, self.keys.float().transpose(1, 2)).mul_(self.scaling)  # (H_kv, G * w, n)
        logits = logits.view(-1, w, self.n)  # (H_q, w, n); query head i belongs to KV head i // G
        causal = torch.ones(w, w, dtype=torch.bool, device=q.device).triu(1)  # True above the diagonal
        logits[:, :, self.n - w :].masked_fill_(causal, float("-inf"))
        if self.pad is not None:  # ragged view: padding keys get no attention
            logits = logits.masked_fill(~self.key_mask.repeat_interleave(self.n_groups, 0)[:, None, :], float("-inf"))
        probs = logits.softmax(-1).to(self.queries.dtype)  # (H_q, w, n)
        return probs[:, :, : self.n - w]

    def attention_column_sums(self, max_elements: int | None = None) -> Tensor:
        """Sum over *all* prompt queries of the causal attention each key receives: (H_q, n).

        H2O's accumulated attention (softmax in fp32, fully causal), computed in query chunks of at most
        ``max_elements`` logits: 2**21 on CPU (cache-friendly), 2**28 on GPU (1 GiB in fp32, few kernel launches).
        A chunk only computes the keys its queries can see (the causal triangle: half the work of the full rows),
        rounded up to a multiple of ``COLSUM_BLOCK`` keys so that the CPU softmax reduces every row in the same
        vector blocks as a full-length masked row (the masked keys add exact zeros): the sums equal the full-row
        computation bit for bit there. Only the chunk's diagonal block needs a mask; the logits and probabilities of
        every chunk go to two buffers allocated once.
        """
        if "colsum" in self.memo:
            return self.memo["colsum"]
        max_elements = max_elements or (2**21 if self.keys.device.type == "cpu" else 2**28)
        n, n_q, hq = self.n, self.queries.shape[1], self.queries.shape[0]
        chunk = max(1, max_elements // (hq * n))
        k_t = self.keys.detach().float().transpose(1, 2)  # (H_kv, d, n); out= buffers need no autograd
        q_all = self.queries.detach().float().reshape(self.n_kv_heads, self.n_groups, n_q, -1)  # (H_kv, G, q, d)
        offset = n - n_q  # queries cover the last q positions of the cache
        total = torch.zeros(hq, n, device=k_t.device)
        buf = torch.empty(2, hq * min(chunk, n_q) * n, device=k_t.device)  # logits and probabilities, reused
        for s in range(0, n_q, chunk):
            e = min(s + chunk, n_q)
            seen = min(n, -(-(e + offset) // COLSUM_BLOCK) * COLSUM_BLOCK)  # keys visible to the chunk, rounded up
            q = q_all[:, :, s:e].reshape(self.n_kv_heads, -1, q_all.shape[-1])  # (H_kv, G * c, d)
            size = hq * (e - s) * seen
            logits = torch.bmm(q, k_t[:, :, :seen], out=buf[0, :size].view(self.n_kv_heads, -1, seen))
            logits = logits.mul_(self.scaling).view(hq, e - s, seen)  # (H_q, c, seen)
            rows = torch.arange(s + offset, e + offset, device=k_t.device)[:, None]  # (c, 1) absolute positions
            cols = torch.arange(s + offset, seen, device=k_t.device)[None, :]  # the diagonal block and padding
            logits[:, :, s + offset :].masked_fill_(cols > rows, float("-inf"))
            if self.pad is not None:  # ragged view: padding keys get no attention
                pad_keys = ~self.key_mask[:, :seen].repeat_interleave(self.n_groups, 0)  # (H_q, seen)
                logits.masked_fill_(pad_keys[:, None, :], float("-inf"))
            probs = torch.softmax(logits, -1, out=buf[1, :size].view(hq, e - s, seen))
            total[:, :seen] += probs.to(self.queries.dtype).float().sum(1)
        self.memo["colsum"] = total
        return total

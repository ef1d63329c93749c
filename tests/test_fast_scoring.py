"""The vectorised scoring paths keep exactly the entries the straightforward ones kept (issue 10, part 6).

Each ``ref_*`` below is the plain implementation the methods used before they were made faster (kept here as the
reference): PyTorch's pooling kernels, ``torch.var``, the per-chunk einsum value norms, boolean-index stage-1
forcing, full-row H2O column sums and the probe scores without reused buffers. The engine runs every affected
method both ways on the tiny models and must keep the same tokens per layer and head, before and after
decode-time eviction.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, load_method
from torch import Tensor, nn

import kvbench.engine.engine
import methods.cake
import methods.compresskv
import methods.defensivekv
import methods.snapkv
import methods.taskkv
from kvbench.engine import Engine, LayerContext
from kvbench.engine.store import LayerKV
from kvbench.engine.view import head_indices, valid_candidates
from kvbench.ops import Workspace, pool1d, stable_ranks, topk_per_head, variance
from methods.defensivekv import DefensiveKV
from methods.epicache import EpiCache


# ---------------------------------------------------------------------------------------------------------------
# the straightforward implementations
# ---------------------------------------------------------------------------------------------------------------
def ref_pool1d(x: Tensor, kernel: int, mode: str = "avg", work: Workspace | None = None) -> Tensor:
    if kernel <= 1 or mode == "none":
        return x
    flat = x.reshape(-1, 1, x.shape[-1])
    if mode == "avg":
        return F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True).reshape(x.shape)
    return F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2).reshape(x.shape)


def ref_variance(x: Tensor, dim: int, work: Workspace | None = None) -> Tensor:
    return x.var(dim)


def ref_value_norms(self: DefensiveKV, ctx: LayerContext, tokens: int | None = None) -> Tensor:
    weight = ctx.module.o_proj.weight
    w_o = weight.T.reshape(ctx.n_kv_heads, ctx.n_groups, ctx.values.shape[-1], -1).float()  # (H, G, d, hidden)
    out = [torch.einsum("hcd,hgdo->hgco", ctx.values[:, s : s + 256].float(), w_o).abs().sum(-1).mean(1)
           for s in range(0, ctx.n, 256)]
    return torch.cat(out, 1)[:, : ctx.n if tokens is None else tokens]


def ref_force_stage1(self: DefensiveKV, s: Tensor, ave: Tensor, attn: Tensor, ctx: LayerContext) -> Tensor:
    w, n = ctx.window, ctx.n
    bias = attn[:, :, max(0, n - 2 * w) : n - w].sum(-1).mean()
    sorted_ave, order = (ave / ave.sum(-1, keepdim=True).clamp_min(1e-30)).sort(-1, descending=True)
    counts = (sorted_ave.cumsum(-1) >= self.tau - bias).int().argmax(-1)
    counts = counts.clamp(max=max(0, int((n - w) * ctx.keep / n - w)))
    forced = torch.arange(s.shape[-1])[None, :] < counts[:, None]
    out = s.clone()
    rows = torch.arange(s.shape[0])[:, None].expand_as(order)
    out[rows[forced], order[forced]] = s.max()
    return out


def ref_column_sums(self: LayerContext, max_elements: int | None = None) -> Tensor:
    if "colsum" in self.memo:
        return self.memo["colsum"]
    chunk = max(1, (max_elements or 2**21) // (self.queries.shape[0] * self.n))
    k, n_q = self.keys.float(), self.queries.shape[1]
    q_all = self.queries.float().reshape(self.n_kv_heads, self.n_groups, n_q, -1)
    total = torch.zeros(self.queries.shape[0], self.n)
    for s in range(0, n_q, chunk):
        q = q_all[:, :, s : s + chunk]
        logits = torch.einsum("hgcd,hnd->hgcn", q, k).flatten(0, 1) * self.scaling
        rows = torch.arange(s, s + q.shape[2])[:, None] + self.n - n_q
        logits.masked_fill_(torch.arange(self.n)[None, :] > rows, float("-inf"))
        total += logits.softmax(-1).to(self.queries.dtype).float().sum(1)
    self.memo["colsum"] = total
    return total


def ref_probe_scores(self: EpiCache, queries: Tensor, layer: LayerKV, scale: float) -> Tensor:
    h = layer.n_heads
    g = queries.shape[0] // h
    out = torch.full((h, int(layer.lens.max())), float("-inf"))
    for k in range(h):
        keys = layer.head(k)[0]
        s = (torch.einsum("gpd,nd->gpn", queries[k * g : (k + 1) * g].float(), keys.float()) * scale).softmax(-1)
        s = s.amax((0, 1))
        s[: self.sink] = float("inf")
        out[k, : len(s)] = s
    return out


def use_references(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (methods.snapkv, methods.cake, methods.defensivekv, methods.taskkv, methods.compresskv):
        monkeypatch.setattr(module, "pool1d", ref_pool1d)
    monkeypatch.setattr(methods.cake, "variance", ref_variance)
    monkeypatch.setattr(DefensiveKV, "value_norms", ref_value_norms)
    monkeypatch.setattr(DefensiveKV, "force_stage1", ref_force_stage1)
    monkeypatch.setattr(LayerContext, "attention_column_sums", ref_column_sums)
    monkeypatch.setattr(EpiCache, "probe_scores", ref_probe_scores)
    monkeypatch.setattr(kvbench.engine.engine, "topk_per_head", ref_topk_per_head)
    monkeypatch.setattr(Engine, "_trim", ref_trim)


# ---------------------------------------------------------------------------------------------------------------
# the operations
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("kernel", [3, 5, 7, 9])
def test_pool1d_equals_the_pooling_kernels_bit_for_bit(dtype, mode, kernel):
    g = torch.Generator().manual_seed(kernel)
    work = Workspace()  # one workspace for every shape: its padding buffer is reused, grown and shrunk
    for shape in [(3, 1), (2, 4), (5, 7), (4, 2016), (2, 3, 32, 333), (2, 5)]:
        x = (torch.rand(*shape, generator=g) * 10.0 ** -int(torch.randint(0, 6, (1,), generator=g))).to(dtype)
        out, ref = pool1d(x, kernel, mode), ref_pool1d(x, kernel, mode)
        assert out.dtype == ref.dtype and torch.equal(out, ref), shape
        assert torch.equal(pool1d(x, kernel, mode, work), ref), shape
    assert pool1d(x, 1, mode) is x


def ref_topk_per_head(scores: Tensor, counts: Tensor) -> list[Tensor]:
    order = scores.float().argsort(dim=-1, descending=True, stable=True)  # ties -> lower index first
    return [order[h, : int(c)].sort().values for h, c in enumerate(counts.clamp(max=scores.shape[1]).tolist())]


def tie_heavy_rows(trial: int, g: torch.Generator) -> Tensor:
    """(h, m) random scores, 1-4 rows of 1-39: six distinct values in three trials of four (uniform otherwise),
    -inf in place of the zeros every third trial, a NaN every eleventh."""
    h, m = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
    scores = torch.randint(0, 6, (h, m), generator=g).float() if trial % 4 else torch.rand(h, m, generator=g)
    if trial % 3 == 0:
        scores[scores == 0] = float("-inf")
    if trial % 11 == 0:
        scores[0, 0] = float("nan")
    return scores


def test_topk_per_head_is_the_stable_sort_prefix():
    """Tie-heavy rows (six distinct values, -inf padding, NaN), ragged counts including 0 and more than m: the same
    sets as the stable descending sort, whether the fast top-k or the sort fallback answers."""
    g = torch.Generator().manual_seed(0)
    for trial in range(600):
        scores = tie_heavy_rows(trial, g)
        h, m = scores.shape
        counts = torch.randint(0, m + 3, (h,), generator=g)
        got, want = topk_per_head(scores, counts), ref_topk_per_head(scores, counts)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), (scores, counts)


def test_stable_ranks_give_the_top_k_sets_and_nested_re_trims():
    """``ranks < c`` is the stable-sort prefix of each row (ties, -inf, NaN), and after keeping it, the kept ranks
    cut at c' < c give what the top-c' of the kept scores alone would (the engine's cascading re-trims)."""
    g = torch.Generator().manual_seed(1)
    for trial in range(400):
        scores = tie_heavy_rows(trial, g)
        h, m = scores.shape
        rank, c = stable_ranks(scores), int(torch.randint(0, m + 1, (1,), generator=g))
        keep = rank < c
        want = ref_topk_per_head(scores, torch.full((h,), c))
        assert all(torch.equal(keep[k].nonzero().squeeze(1), want[k]) for k in range(h)), (scores, c)
        kept, kept_rank = scores[keep].view(h, c), rank[keep].view(h, c)
        c2 = int(torch.randint(0, c + 1, (1,), generator=g))
        again = ref_topk_per_head(kept, torch.full((h,), c2))
        assert all(torch.equal((kept_rank[k] < c2).nonzero().squeeze(1), again[k]) for k in range(h))


def ref_trim(self: Engine, i: int, counts: Tensor) -> None:
    """The engine's re-trim before ranks: a top-k of the (gathered) pending scores at every trim."""
    p, layer = self._pending[i], self.store.layers[i]
    h, m = p.scores.shape
    counts = torch.minimum(counts.clamp(0, m), valid_candidates(m, h, p.pad).to(counts.device))
    if p.pad is None and bool((counts == m).all()):
        self.decode_budget[i] = (m, p.n - m)
        return
    picks = ref_topk_per_head(p.scores, counts)
    tail = torch.arange(m, p.n)
    layer.select(head_indices([torch.cat([idx, tail]) for idx in picks], p.pad))
    self.decode_budget[i] = (int(counts[0]), p.n - m)
    if bool((counts == counts[0]).all()) and p.pad is None:
        p.scores = torch.stack([p.scores[k, idx] for k, idx in enumerate(picks)])
        p.n = int(counts[0]) + p.n - m
    else:
        del self._pending[i]


@pytest.mark.parametrize(("h", "g", "p", "lens", "d"), [(2, 2, 40, (333, 333), 16), (1, 4, 7, (100,), 64),
                                                      (3, 1, 25, (50, 80, 65), 8)])
def test_probe_scores_equal_the_einsum_softmax_bit_for_bit(h, g, p, lens, d):
    gen = torch.Generator().manual_seed(sum(lens))
    keys, values = torch.randn(sum(lens), d, generator=gen) * 2, torch.randn(sum(lens), d, generator=gen)
    positions = torch.cat([torch.arange(n) for n in lens])
    layer = LayerKV(keys, values, torch.tensor(lens), positions)  # ragged when the lengths differ
    method = EpiCache()
    for _ in range(2):  # the second call reuses (and outgrows, for another shape) the workspace buffers
        q = torch.randn(h * g, p, d, generator=gen) * 2
        out = method.probe_scores(q, layer, d**-0.5)
        assert torch.equal(out, ref_probe_scores(method, q, layer, d**-0.5))
        p += 3


def test_workspace_reuses_its_buffer_and_grows():
    work = Workspace()
    a = work.get("x", (4, 8), torch.device("cpu"))
    b = work.get("x", (2, 3), torch.device("cpu"))  # smaller: the same storage
    assert a.shape == (4, 8) and b.shape == (2, 3) and b.data_ptr() == a.data_ptr()
    assert work.get("y", (2, 3), torch.device("cpu")).data_ptr() != a.data_ptr()  # another name, another buffer
    c = work.get("x", (10, 10), torch.device("cpu"))  # larger: a new buffer, kept from now on
    assert c.numel() == 100 and work.get("x", (5,), torch.device("cpu")).data_ptr() == c.data_ptr()


@pytest.mark.parametrize(("h", "g", "d", "hidden", "n"), [(2, 2, 64, 256, 600), (3, 3, 64, 576, 300),
                                                           (1, 4, 32, 96, 50)])
def test_value_norms_equal_the_reference_bit_for_bit_whatever_the_chunk(h, g, d, hidden, n):
    """The embedded model's shapes (256-token chunks), SmolLM2-135M's (64: capped at 1 MiB of products), tiny."""
    gen = torch.Generator().manual_seed(n)
    module = nn.Module()
    module.o_proj = nn.Linear(h * g * d, hidden, bias=False)
    nn.init.normal_(module.o_proj.weight, generator=gen)
    values = torch.randn(h, n, d, generator=gen)
    ctx = LayerContext(layer_idx=0, n_layers=1, module=module, queries=torch.zeros(h * g, 1, d), keys=values,
                       values=values, positions=torch.arange(n), window=4, keep=n // 2, scaling=d**-0.5)
    ref = ref_value_norms(DefensiveKV(), ctx, n - 4)
    for chunk in (256, 64, 7):
        assert torch.equal(DefensiveKV(norm_chunk=chunk).value_norms(ctx, n - 4), ref), chunk


def test_variance_is_torch_var():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        attn = torch.rand(4, 32, 500, generator=g).pow(4).softmax(-1).to(dtype)  # (H_q, w, m) like window attention
        out = variance(attn, 1)
        assert out.dtype == dtype and out.shape == (4, 500)
        torch.testing.assert_close(out, attn.var(1), rtol=1e-6, atol=0)
        torch.testing.assert_close(variance(attn, -1), attn.var(-1), rtol=1e-6, atol=0)
    work, x = Workspace(), torch.rand(4, 32, 500, generator=g, dtype=torch.float64)
    for shape in [(4, 32, 500), (2, 8, 30), (4, 32, 500)]:  # the float64 buffer reused, and the input untouched
        part = x[: shape[0], : shape[1], : shape[2]]
        y = part.clone()
        assert torch.equal(variance(y, 1, work), variance(y, 1)) and torch.equal(y, part)


@pytest.mark.parametrize(("hkv", "g", "n", "n_q", "d"),
                         [(2, 2, 300, 300, 16), (1, 4, 333, 100, 8), (4, 2, 129, 129, 32)])
@pytest.mark.parametrize("max_elements", [None, 2**14, 2**12, 50])
def test_column_sums_over_the_causal_triangle(hkv, g, n, n_q, d, max_elements):
    gen = torch.Generator().manual_seed(n + n_q)
    q, k = torch.randn(hkv * g, n_q, d, generator=gen) * 2, torch.randn(hkv, n, d, generator=gen) * 2
    ctx = LayerContext(layer_idx=0, n_layers=1, module=nn.Identity(), queries=q, keys=k, values=k,
                       positions=torch.arange(n), window=4, keep=n // 2, scaling=d**-0.5)
    out = ctx.attention_column_sums(max_elements)
    torch.testing.assert_close(out, ref_column_sums(dataclasses.replace(ctx, memo={}), max_elements), rtol=1e-6,
                               atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# the kept sets, through the engine
# ---------------------------------------------------------------------------------------------------------------
def kept(model, name: str, ids: Tensor, budget: float) -> tuple[list, list]:
    method, allocator = load_method(name)
    with Engine(model, method, allocator, budget=budget) as eng:
        eng.reset()
        if name == "epicache":  # one block-wise episode cache: the probe scores the cache after every block
            eng.layer_keep = [max(1, int(budget * ids.numel()))] * eng.n_layers
            for start in range(0, ids.numel(), 80):
                logits = eng.forward(ids[start : start + 80])
                eng.probe(ids[-40:])
        else:
            logits = eng.forward(ids, compress=True)
        prefill = [[ly.head(h)[2].tolist() for h in range(ly.n_heads)] for ly in eng.store.layers]
        eng.generate(logits, 5)
        decoded = [[ly.head(h)[2].tolist() for h in range(ly.n_heads)] for ly in eng.store.layers]
    return prefill, decoded


@pytest.mark.parametrize("arch", ARCHS[:1])  # the scoring paths do not depend on the architecture
@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "adakv", "cake", "cake_nocascade", "defensivekv",
                                  "layer_defensivekv", "h2o", "taskkv", "epicache"])
def test_fast_paths_keep_the_same_entries(tiny_model, prompt, monkeypatch, arch, name):
    ids = prompt(240, seed=11)
    for budget in (0.2, 0.05):
        fast = kept(tiny_model(arch), name, ids, budget)
        with monkeypatch.context() as patch:
            use_references(patch)
            assert kept(tiny_model(arch), name, ids, budget) == fast, f"budget {budget}"

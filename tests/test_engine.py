"""The engine: exactness against plain transformers, ragged storage, ragged attention, positions after eviction."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from conftest import ARCHS, EVICTING_METHODS, HEAD_DIM, N_HEADS, N_KV_HEADS, N_LAYERS, ROOT, load_method
from torch import Tensor
from transformers import AttentionInterface

from kvbench.budget import Allocator, Uniform
from kvbench.engine import Engine, KVStore, LayerContext, LayerKV
from kvbench.engine.attention import (
    cached_attention,
    causal_attention,
    check_backend,
    flash_attn_available,
    varlen_attention,
    varlen_reference,
)
from kvbench.method import Method
from methods.fullkv import FullKV

G = N_HEADS // N_KV_HEADS
COMPRESSING = tuple(m for m in EVICTING_METHODS if m != "fullkv")  # quantising methods: tests/test_quant.py


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def full_logits(model, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0]


def run_fullkv(model, ids: Tensor, backend: str = "sdpa", chunks: tuple[int, ...] = ()) -> list[Tensor]:
    """Last-token logits of every chunk, through the engine with FullKV."""
    bounds = [0, *chunks, len(ids)]
    with Engine(model, FullKV(), Uniform(), budget=1.0, backend=backend) as eng:
        eng.reset()
        return [eng.forward(ids[s:e]) for s, e in zip(bounds[:-1], bounds[1:], strict=True)]


# ---------------------------------------------------------------------------------------------------------------
# exactness of the FullKV path
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fullkv_matches_transformers_one_prefill(tiny_model, prompt, arch, backend):
    model, ids = tiny_model(arch), prompt(160)
    ref = full_logits(model, ids)
    (out,) = run_fullkv(model, ids, backend)
    torch.testing.assert_close(out, ref[-1], atol=1e-5, rtol=0)
    assert model.config._attn_implementation == "eager", "the engine must restore the model's attention on exit"


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fullkv_matches_transformers_two_chunks(tiny_model, prompt, arch, backend):
    model, ids = tiny_model(arch), prompt(160)
    ref = full_logits(model, ids)
    first, second, single = run_fullkv(model, ids, backend, chunks=(97, 159))  # 97 + 62 + 1 tokens
    torch.testing.assert_close(first, ref[96], atol=1e-5, rtol=0)
    torch.testing.assert_close(second, ref[158], atol=1e-5, rtol=0)
    torch.testing.assert_close(single, ref[159], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_fullkv_greedy_generation_matches_transformers_generate(tiny_model, prompt, arch):
    model, ids = tiny_model(arch), prompt(120, seed=ARCHS.index(arch))
    with torch.no_grad():
        ref = model.generate(ids[None], max_new_tokens=10, do_sample=False, min_new_tokens=10)[0, len(ids):].tolist()
    with Engine(model, FullKV(), Uniform(), budget=1.0) as eng:
        eng.reset()
        tokens, times = eng.generate(eng.forward(ids), max_new_tokens=10)
        assert eng.store.next_position == len(ids) + 9  # the last token is returned, not fed back
    assert tokens == ref
    assert len(times) == 9


def test_engine_rejects_batches_and_restores_model(tiny_model, prompt):
    model, ids = tiny_model("llama"), prompt(20)
    before = full_logits(model, ids)
    with Engine(model, FullKV(), Uniform(), budget=1.0) as eng:
        assert model.config._attn_implementation == "kvbench"
        eng.reset()
        with pytest.raises(ValueError, match="batch size 1"), torch.no_grad():
            model(ids[None].repeat(2, 1), use_cache=False)
    assert model.config._attn_implementation == "eager"
    assert not any(hasattr(m, "_kvbench_engine") for m in model.modules())
    assert torch.equal(full_logits(model, ids), before)  # no hook or attention left behind


# ---------------------------------------------------------------------------------------------------------------
# LayerKV / KVStore on hand-made ragged tensors
# ---------------------------------------------------------------------------------------------------------------
def tagged_layer(per_head: list[list[int]]) -> LayerKV:
    """A layer whose key for (head h, original position p) is [h, p] and whose value is [-h, -p] (d = 2)."""
    keys = torch.tensor([[h, p] for h, ps in enumerate(per_head) for p in ps], dtype=torch.float32).reshape(-1, 2)
    lens = torch.tensor([len(ps) for ps in per_head], dtype=torch.long)
    pos = torch.tensor([p for ps in per_head for p in ps], dtype=torch.int32)
    return LayerKV(keys, -keys, lens, pos)


def assert_layer_holds(layer: LayerKV, per_head: list[list[int]]) -> None:
    expected = tagged_layer(per_head)
    assert layer.lens.tolist() == [len(ps) for ps in per_head]
    assert torch.equal(layer.keys, expected.keys)
    assert torch.equal(layer.values, expected.values)
    assert layer.positions.tolist() == expected.positions.tolist()
    for h, ps in enumerate(per_head):
        k, v, p = layer.head(h)
        assert p.tolist() == ps
        assert k[:, 1].tolist() == [float(x) for x in ps] and (k[:, 0] == h).all()
        assert torch.equal(v, -k)


def new_tokens(n_heads: int, positions: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    k = torch.tensor([[[h, p] for p in positions] for h in range(n_heads)], dtype=torch.float32)  # (H, q, 2)
    return k, -k, torch.tensor(positions)


def test_layerkv_append_select_truncate_ragged():
    layer = tagged_layer([[0, 1, 2], [2], [1, 2]])
    assert not layer.uniform and layer.n_heads == 3
    layer.append(*new_tokens(3, [3, 4]))
    assert_layer_holds(layer, [[0, 1, 2, 3, 4], [2, 3, 4], [1, 2, 3, 4]])
    layer.select([torch.tensor([4, 0]), torch.tensor([1]), torch.tensor([3, 0, 1])])  # unsorted on purpose
    assert_layer_holds(layer, [[0, 4], [3], [1, 2, 4]])
    layer.truncate(torch.tensor([1, 1, 2]))
    assert_layer_holds(layer, [[0], [3], [1, 2]])
    assert layer.nbytes() == 4 * 2 * 4 * 2  # 4 entries, d = 2, fp32, keys + values


def test_layerkv_append_to_an_empty_head():
    layer = tagged_layer([[0, 1], [], [1]])
    layer.append(*new_tokens(3, [5]))
    assert_layer_holds(layer, [[0, 1, 5], [5], [1, 5]])


def test_layerkv_append_to_a_layer_with_no_tokens_left():
    # Layer-DefensiveKV's model-wide top-k can take every token of a layer
    layer = tagged_layer([[], [], []])
    layer.append(*new_tokens(3, [7]))
    assert_layer_holds(layer, [[7], [7], [7]])


def test_layerkv_from_dense_and_uniform_fast_path():
    torch.manual_seed(0)
    k, v = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    layer = LayerKV.from_dense(k, v, torch.arange(10, 14))
    assert layer.uniform and layer.lens.tolist() == [4, 4]
    assert layer.positions.tolist() == [10, 11, 12, 13] * 2
    dk, dv = layer.dense()
    assert torch.equal(dk, k) and torch.equal(dv, v)
    k2, v2 = torch.randn(2, 3, 3), torch.randn(2, 3, 3)
    layer.append(k2, v2, torch.tensor([14, 15, 16]))
    dk, dv = layer.dense()
    assert torch.equal(dk, torch.cat([k, k2], 1)) and torch.equal(dv, torch.cat([v, v2], 1))
    assert layer.positions.tolist() == list(range(10, 17)) * 2


def test_layerkv_uniform_fast_path_equals_ragged_path(monkeypatch):
    torch.manual_seed(1)
    k, v = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    k2, v2, pos2 = torch.randn(3, 2, 4), torch.randn(3, 2, 4), torch.tensor([5, 6])
    fast = LayerKV.from_dense(k, v, torch.arange(5))
    fast.append(k2, v2, pos2)
    slow = LayerKV.from_dense(k, v, torch.arange(5))
    with monkeypatch.context() as mp:
        mp.setattr(LayerKV, "uniform", property(lambda self: False))
        slow.append(k2, v2, pos2)
    for name in ("keys", "values", "positions", "lens"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_kvstore_bytes_snapshot_rollback():
    store = KVStore(2)
    store.layers[0] = tagged_layer([[0, 2, 3], [1, 3]])
    torch.manual_seed(0)
    store.layers[1] = LayerKV.from_dense(torch.randn(2, 4, 2), torch.randn(2, 4, 2), torch.arange(4))
    store.next_position = 4
    assert store.lengths() == [[3, 2], [4, 4]]
    assert store.n_entries() == 13
    assert store.nbytes() == 13 * 2 * 4 * 2
    before = [(ly.keys.clone(), ly.values.clone(), ly.positions.clone(), ly.lens.clone()) for ly in store.layers]
    snap = store.snapshot()
    for step in range(3):
        for layer in store.layers:
            layer.append(*new_tokens(2, [4 + step]))
        store.next_position += 1
        store.track_peak()
    assert store.lengths() == [[6, 5], [7, 7]]
    assert store.peak_bytes == 25 * 2 * 4 * 2
    store.rollback(snap)
    assert store.next_position == 4
    for layer, (k, v, p, n) in zip(store.layers, before, strict=True):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
        assert torch.equal(layer.positions, p) and torch.equal(layer.lens, n)
    store.reset_peak()
    assert store.peak_bytes == store.nbytes()


@pytest.mark.parametrize("name", ["adakv", "snapkv"])
def test_engine_rollback_replays_question_exactly(tiny_model, prompt, name):
    method, alloc = load_method(name)
    ids, question = prompt(200), prompt(12, seed=5)
    with Engine(tiny_model("qwen2"), method, alloc, budget=0.4) as eng:
        eng.reset()
        eng.forward(ids, compress=True)
        lengths, n_entries = eng.store.lengths(), eng.store.n_entries()
        snap = eng.store.snapshot()
        first = eng.forward(question)
        eng.generate(first, max_new_tokens=4)
        assert eng.store.n_entries() == n_entries + N_LAYERS * N_KV_HEADS * (12 + 3)
        eng.store.rollback(snap)
        assert eng.store.lengths() == lengths and eng.store.next_position == 200
        again = eng.forward(question)
    assert torch.equal(first, again)


# ---------------------------------------------------------------------------------------------------------------
# attention over ragged caches
# ---------------------------------------------------------------------------------------------------------------
def reference_attention(q: Tensor, layer: LayerKV, scale: float) -> Tensor:
    """Per query head, softmax over its own KV head's keys only (KV head = i // G), bottom-right causal, fp64.

    q (Hq, q, d) -> (q, Hq, d)."""
    hq, q_len, d = q.shape
    g = hq // layer.n_heads
    out = torch.zeros(q_len, hq, layer.values.shape[-1], dtype=torch.float64)
    for i in range(hq):
        k, v, _ = layer.head(i // g)
        for t in range(q_len):
            limit = k.shape[0] - q_len + t + 1  # the q new tokens sit at the end of the head's segment
            logits = (k[:limit].double() @ q[i, t].double()) * scale
            out[t, i] = logits.softmax(0) @ v[:limit].double()
    return out.float()


def random_layer(lens: list[int], d: int = 8, seed: int = 0) -> LayerKV:
    g = torch.Generator().manual_seed(seed)
    t = sum(lens)
    keys = torch.randn(t, d, generator=g) * 2  # peaked enough that a wrong mask shows
    values = torch.randn(t, d, generator=g)
    pos = torch.cat([torch.arange(n, dtype=torch.int32) for n in lens])
    return LayerKV(keys, values, torch.tensor(lens), pos)


LAYOUTS = {"ragged": [9, 4], "ragged_short_first": [3, 11], "uniform": [6, 6]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_cached_attention_matches_per_head_reference(layout, q_len, backend):
    layer = random_layer(LAYOUTS[layout])
    q = torch.randn(4, q_len, 8, generator=torch.Generator().manual_seed(7)) * 2  # Hq = 4, Hkv = 2
    scale = 8**-0.5
    out = cached_attention(q, layer, scale, backend)
    assert out.shape == (q_len, 4, 8)
    torch.testing.assert_close(out, reference_attention(q, layer, scale), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("q_len", [1, 3])
def test_varlen_layout_matches_per_head_reference(layout, q_len):
    """The (H*q, G, d) query packing and cu_seqlens used with flash_attn_varlen_func on GPU."""
    layer = random_layer(LAYOUTS[layout], seed=3)
    q = torch.randn(4, q_len, 8, generator=torch.Generator().manual_seed(8)) * 2
    scale = 8**-0.5
    out = varlen_attention(q, layer, scale, varlen_reference)
    assert out.shape == (q_len, 4, 8)
    torch.testing.assert_close(out, reference_attention(q, layer, scale), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_causal_attention_prefill_matches_reference(backend):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 7, 8) * 2, torch.randn(1, 2, 7, 8) * 2, torch.randn(1, 2, 7, 8)
    layer = LayerKV.from_dense(k[0], v[0], torch.arange(7))
    out = causal_attention(q, k, v, 8**-0.5, backend)  # (1, n, Hq, d)
    torch.testing.assert_close(out[0], reference_attention(q[0], layer, 8**-0.5), atol=1e-5, rtol=1e-5)


def test_check_backend_messages():
    assert check_backend("sdpa") == "sdpa" and check_backend("eager") == "eager"
    with pytest.raises(ValueError, match="not supported"):
        check_backend("flash_attention_3")
    with pytest.raises(ValueError):
        Engine(torch.nn.Linear(2, 2), FullKV(), Uniform(), budget=1.0, backend="magic")
    if flash_attn_available():
        pytest.skip("flash-attn is installed with a GPU here")
    # a clear, user-facing error (kvbench.errors.UsageError, a ValueError, since commit 7933473; RuntimeError before)
    with pytest.raises((RuntimeError, ValueError), match="flash-attn package and a CUDA GPU") as err:
        check_backend("flash_attention_2")
    assert "sdpa" in str(err.value)
    with pytest.raises((RuntimeError, ValueError), match="flash-attn"):
        Engine(torch.nn.Linear(2, 2), FullKV(), Uniform(), budget=1.0, backend="flash_attention_2")


# ---------------------------------------------------------------------------------------------------------------
# positions and eviction: compressed decode == plain attention with exactly the evicted entries masked out
# ---------------------------------------------------------------------------------------------------------------
REF_ATTN = "kvbench_test_masked_eager"
_REF_ALLOWED: dict[int, Tensor] = {}  # layer -> (Hq, N, N) bool, True = attend


def _masked_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Plain fp64 attention over the full sequence with a per-layer, per-head boolean mask."""
    g = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(g, 1).double()
    v = value.repeat_interleave(g, 1).double()
    logits = query.double() @ k.transpose(-1, -2) * scaling  # (1, Hq, N, N)
    logits = logits.masked_fill(~_REF_ALLOWED[module.layer_idx][None], float("-inf"))
    out = logits.softmax(-1) @ v
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def masked_reference_logits(model, ids: Tensor, n: int, kept: list[list[Tensor]]) -> Tensor:
    """Logits of every token of ``ids`` when rows >= n see, in layer l and KV head h, only the prompt positions
    ``kept[l][h]`` plus the tokens from n on (causally); rows < n are ordinary causal attention. ``kept[l]`` may
    also hold one entry per query head (a ``cache: query_head`` method)."""
    big = len(ids)
    for layer_idx, heads in enumerate(kept):
        allowed = torch.ones(N_HEADS, big, big, dtype=torch.bool).tril()
        for hq in range(N_HEADS):
            row = torch.zeros(n, dtype=torch.bool)
            row[heads[hq // (N_HEADS // len(heads))].long()] = True
            allowed[hq, n:, :n] = row
        _REF_ALLOWED[layer_idx] = allowed
    AttentionInterface.register(REF_ATTN, _masked_eager)
    try:
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(REF_ATTN, lambda *a, **k: None)
    except ImportError:
        pass
    saved = model.config._attn_implementation
    model.config._attn_implementation = REF_ATTN
    try:
        with torch.no_grad():
            return model(ids[None]).logits[0]
    finally:
        model.config._attn_implementation = saved
        _REF_ALLOWED.clear()


def compressed_decode(model, name: str, ids: Tensor, budget: float, steps: int = 3):
    method, alloc = load_method(name)
    with Engine(model, method, alloc, budget=budget) as eng:
        eng.reset()
        logits = [eng.forward(ids, compress=True)]
        kept = [[layer.head(h)[2].clone() for h in range(layer.n_heads)] for layer in eng.store.layers]
        tokens = []
        for _ in range(steps):
            tokens.append(int(logits[-1].argmax()))
            logits.append(eng.forward([tokens[-1]]))
        store = eng.store
    return logits, tokens, kept, store


CASES = [(name, "llama") for name in COMPRESSING] + [("adakv", a) for a in ARCHS if a != "llama"]


@pytest.mark.parametrize(("name", "arch"), CASES)
def test_compressed_decode_equals_masked_full_attention(tiny_model, prompt, name, arch):
    model, ids, n = tiny_model(arch), prompt(200, seed=1), 200
    logits, tokens, kept, store = compressed_decode(model, name, ids, budget=0.3)

    # positions: kept tokens keep their original positions, new tokens continue from n
    assert store.next_position == n + len(tokens)
    for layer_idx, layer in enumerate(store.layers):
        for h in range(layer.n_heads):
            prompt_pos = kept[layer_idx][h]
            assert len(prompt_pos) < n, "budget 0.3 must evict"
            assert prompt_pos.tolist() == sorted(set(prompt_pos.tolist())) and int(prompt_pos.min()) >= 0
            assert int(prompt_pos.max()) < n
            assert layer.head(h)[2].tolist() == prompt_pos.tolist() + list(range(n, n + len(tokens)))

    if name in ("adakv", "defensivekv"):  # head-adaptive: the ragged storage and attention paths are exercised
        assert any(len(set(k.tolist())) > 1 for k in (torch.tensor([len(p) for p in heads]) for heads in kept))

    full = torch.cat([ids, torch.tensor(tokens)])
    ref = masked_reference_logits(model, full, n, kept)
    for step, out in enumerate(logits):
        torch.testing.assert_close(out, ref[n - 1 + step], atol=1e-4, rtol=0, msg=f"step {step}")
    # the eviction mattered: plain full attention gives other decode logits (so the check above can fail)
    plain = full_logits(model, full)
    assert (plain[n] - logits[1]).abs().max() > 1e-3


def test_wrong_decode_position_is_detected(tiny_model, prompt):
    """Negative control for the test above: if new tokens were placed at the kept length, logits would differ."""
    model, ids, n = tiny_model("llama"), prompt(200, seed=1), 200
    method, alloc = load_method("snapkv")
    with Engine(model, method, alloc, budget=0.3) as eng:
        eng.reset()
        tok = int(eng.forward(ids, compress=True).argmax())
        kept = [[layer.head(h)[2].clone() for h in range(layer.n_heads)] for layer in eng.store.layers]
        eng.store.next_position = int(eng.store.layers[0].lens[0])  # wrong: the compressed length
        wrong = eng.forward([tok])
    ref = masked_reference_logits(model, torch.cat([ids, torch.tensor([tok])]), n, kept)
    assert (wrong - ref[n]).abs().max() > 1e-3


@dataclass
class _KeepAll(Allocator):
    name: str = "keep_all"

    def allocate(self, scores: Tensor, keep: int, layer: int, n_layers: int, ctx: object = None) -> Tensor:
        return torch.full((scores.shape[0],), scores.shape[1], dtype=torch.long)


@dataclass
class _Scrambled(Method):
    """Random scores, so the selected indices arrive in a random order."""

    name: str = "scrambled"
    window: int = 4

    def score(self, ctx: LayerContext) -> Tensor:
        g = torch.Generator().manual_seed(ctx.layer_idx)
        return torch.rand(ctx.n_kv_heads, ctx.n - ctx.window, generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_compressed_path_keeping_everything_equals_fullkv(tiny_model, prompt, arch):
    model, ids = tiny_model(arch), prompt(150)
    with Engine(model, FullKV(), Uniform(), budget=1.0) as eng:
        eng.reset()
        ref = [eng.forward(ids)]
        ref += [eng.forward([int(ref[-1].argmax())]) for _ in range(3)]
    with Engine(model, _Scrambled(), _KeepAll(), budget=0.5) as eng:
        eng.reset()
        out = [eng.forward(ids, compress=True)]
        assert eng.compress_seconds > 0, "the compressed path must have run"
        for layer in eng.store.layers:
            assert layer.lens.tolist() == [150, 150]
            assert layer.positions.tolist() == list(range(150)) * 2
        out += [eng.forward([int(out[-1].argmax())]) for _ in range(3)]
        assert eng.store.layers[1].head(1)[2].tolist()[-3:] == [150, 151, 152]
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# memory: per-layer compression bounds the peak during prefill
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["snapkv", "defensivekv"])
def test_peak_bytes_during_compressed_prefill(tiny_model, prompt, name):
    model, ids, n = tiny_model("mistral"), prompt(200), 200
    full_layer = N_KV_HEADS * n * HEAD_DIM * 4 * 2  # fp32 keys + values
    with Engine(model, FullKV(), Uniform(), budget=1.0) as eng:
        eng.reset()
        eng.forward(ids)
        assert eng.store.nbytes() == N_LAYERS * full_layer
        assert eng.store.peak_bytes == N_LAYERS * full_layer
    method, alloc = load_method(name)
    with Engine(model, method, alloc, budget=0.2) as eng:
        eng.reset()
        eng.forward(ids, compress=True)
        peak, held = eng.store.peak_bytes, eng.store.nbytes()
        first = eng.store.layers[0].nbytes()
    assert held < peak < N_LAYERS * full_layer
    # the largest moment: layer 0 already compressed while layer 1 still holds its n tokens
    assert peak == first + full_layer
    assert math.isclose(held, 0.2 * N_LAYERS * full_layer, rel_tol=0.02)


# ---------------------------------------------------------------------------------------------------------------
# imports: every library module must import on its own, whatever was imported before
# ---------------------------------------------------------------------------------------------------------------
_IMPORT_EACH = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for mod in [m for m in sys.modules if m.split('.')[0] in ('kvbench', 'methods')]:
        del sys.modules[mod]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f'{name}: {type(exc).__name__}: {exc}')
print('\\n'.join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_first():
    """E.g. ``import kvbench.method`` in a fresh interpreter (what a user's own method file does first)."""
    mods = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for pkg in ("kvbench", "methods")
        for p in (ROOT / pkg).rglob("*.py")
        if p.name != "__init__.py" and p.name != "__main__.py"
    )
    mods = [m for m in mods if m.split(".")[1] in ("method", "budget", "ops", "engine") or m.startswith("methods.")]
    assert "kvbench.method" in mods and "methods.snapkv" in mods
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *mods], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]

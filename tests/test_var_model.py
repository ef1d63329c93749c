"""The VAR runner's modules: checkpoint names and shapes, the sampler, CFG, and the cache's byte accounting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvbench.var.generate import cfg_logits, generate, sample_top_k_top_p
from kvbench.var.model import VAR, VARConfig
from kvbench.var.quant import VQVAE, VAEConfig

REF = json.loads((Path(__file__).parent / "fixtures" / "var" / "reference_shapes.json").read_text())
SMALL_PN = (1, 2, 3, 4, 6, 8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)


def shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def small() -> tuple[VAR, VQVAE]:
    """The config of the recorded small reference (build_vae_var(depth=2, V=64, Cvae=8, ch=32))."""
    var = VAR(VARConfig(depth=2, embed_dim=128, num_heads=2, patch_nums=SMALL_PN, vocab_size=64, z_channels=8))
    return var.eval(), VQVAE(VAEConfig(vocab_size=64, z_channels=8, ch=32, patch_nums=SMALL_PN)).eval()


def test_small_model_has_the_authors_names_and_loads_their_state_dict_strictly() -> None:
    var, vae = small()
    assert shapes(var) == REF["small"]["var"] and shapes(vae) == REF["small"]["vae"]
    g = torch.Generator().manual_seed(0)
    for module, ref in ((var, REF["small"]["var"]), (vae, REF["small"]["vae"])):
        own = module.state_dict()
        state = {k: (torch.randn(s, generator=g) * 5).to(own[k].dtype) for k, s in ref.items()}  # lvl_1L: long
        module.load_state_dict(state, strict=True)
        assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("depth", [16, 30])
def test_released_shapes(depth: int) -> None:
    """var_d16 / var_d30 and vae_ch160v4096z32 as the authors' build_vae_var makes them (built on meta: no memory)."""
    with torch.device("meta"):
        var, vae = VAR(VARConfig.released(depth)), VQVAE(VAEConfig())
    assert shapes(var) == REF[f"d{depth}"]["var"]
    assert shapes(vae) == REF["vae_ch160v4096z32"]


def test_sampler_top_k_top_p_semantics() -> None:
    logits = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]])
    seen = {int(sample_top_k_top_p(logits, 2, 0.0, torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {2, 3}, "top-k 2 keeps the two largest logits"
    p = logits.softmax(-1)[0, 0]  # 0.032, 0.087, 0.237, 0.644
    seen = {int(sample_top_k_top_p(logits, 0, 0.8, torch.Generator().manual_seed(s))) for s in range(200)}
    assert float(p[:2].sum()) <= 0.2 < float(p[:3].sum()) and seen == {2, 3}, "top-p drops the 1 - p tail"
    seen = {int(sample_top_k_top_p(logits, 0, 0.5, torch.Generator().manual_seed(s))) for s in range(200)}
    assert seen == {3}, "the largest logit always survives"


def test_cfg_ramp_is_linear_in_the_step() -> None:
    cond, uncond = torch.full((1, 1, 2), 2.0), torch.full((1, 1, 2), 1.0)
    both = torch.cat([cond, uncond])
    assert torch.equal(cfg_logits(both, 0, 5, 1.5), cond), "t = 0 at the first step"
    assert torch.allclose(cfg_logits(both, 4, 5, 1.5), (1 + 1.5) * cond - 1.5 * uncond)
    assert torch.allclose(cfg_logits(both, 2, 5, 1.5), 1.75 * cond - 0.75 * uncond)


def random_small(seed: int = 0) -> tuple[VAR, VQVAE]:
    var, vae = small()
    g = torch.Generator().manual_seed(seed)
    for p in list(var.parameters()) + list(vae.parameters()):
        p.data = torch.randn(p.shape, generator=g) * 0.1
    return var, vae


def test_sampler_is_deterministic_under_a_seed() -> None:
    var, vae = random_small()
    labels = torch.tensor([1, 5])
    a, b = generate(var, vae, labels, seed=3), generate(var, vae, labels, seed=3)
    c = generate(var, vae, labels, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens, strict=True)) and torch.equal(a.image, b.image)
    assert any(not torch.equal(x, y) for x, y in zip(a.tokens, c.tokens, strict=True)), "another seed, other tokens"
    assert [t.shape[1] for t in a.tokens] == [p * p for p in SMALL_PN] and a.image.shape == (2, 3, 128, 128)
    assert float(a.image.min()) >= 0 and float(a.image.max()) <= 1


def test_cache_holds_and_counts_both_cfg_streams() -> None:
    var, vae = random_small()
    out = generate(var, vae, torch.tensor([1, 5, 7]), seed=0, decode=False)
    cache, total = out.cache, sum(p * p for p in SMALL_PN)
    streams, heads, d = 6, 2, 64  # 2B streams: 3 conditional + 3 unconditional rows of the CFG batch
    assert cache.n_streams == streams and all(ly.n_heads == streams * heads for ly in cache.layers)
    assert all(ly.lens.tolist() == [total] * streams * heads for ly in cache.layers)
    assert cache.nbytes() == cache.peak_bytes == 2 * streams * heads * total * d * 4 * 2  # blocks x K and V fp32
    assert [r.entries_before for r in cache.records] == [2 * streams * heads * sum(p * p for p in SMALL_PN[:i + 1])
                                                         for i in range(len(SMALL_PN))]
    spans = cache.spans
    assert spans["condition"] == (0, 1) and spans["scale_1"] == (1, 5) and spans["scale_5"] == (total - 64, total)


def test_ragged_rows_attend_exactly_like_each_row_alone() -> None:
    """After per-head eviction rows hold different lengths: padded SDPA with a mask equals per-row attention."""
    from kvbench.engine.store import LayerKV
    from kvbench.var.cache import VarKVCache

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(4, 9, 8, generator=g), torch.randn(4, 9, 8, generator=g)
    layer = LayerKV.from_dense(k, v, torch.arange(9))
    keep = [torch.tensor([0, 3, 8]), torch.arange(9), torch.tensor([2]), torch.tensor([1, 2, 4, 5, 7])]
    layer.select(keep)
    q = torch.randn(4, 5, 8, generator=g)
    out = VarKVCache._attention(layer, q, scale=0.7)
    for r, idx in enumerate(keep):
        att = torch.softmax(q[r] @ k[r, idx].T * 0.7, dim=-1)
        assert torch.allclose(out[r], att @ v[r, idx], atol=1e-6)


def test_bit_identical_to_the_authors_code_when_available(tmp_path, monkeypatch) -> None:
    """With ``KVBENCH_VAR_REFERENCE`` = a checkout of FoundationVision/VAR (checked at 78b9539): their model and ours
    on the same random weights, strict loads both ways, give the same image bit for bit. Skipped otherwise."""
    import os
    import sys

    ref_dir = os.environ.get("KVBENCH_VAR_REFERENCE")
    if not ref_dir:
        pytest.skip("set KVBENCH_VAR_REFERENCE to a FoundationVision/VAR checkout to compare with the authors' code")
    (tmp_path / "dist.py").write_text("def get_device():\n    return 'cpu'\n\n\ndef initialized():\n    return False\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(ref_dir)
    from models import build_vae_var  # the authors' package, from their checkout

    nn = torch.nn  # build_vae_var disables reset_parameters of these classes globally: restored at teardown
    for clz in (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d,
                nn.ConvTranspose2d):
        monkeypatch.setattr(clz, "reset_parameters", clz.reset_parameters)

    vae_ref, var_ref = build_vae_var(device="cpu", patch_nums=SMALL_PN, V=64, Cvae=8, ch=32, depth=2,
                                     flash_if_available=False, fused_if_available=False)
    g = torch.Generator().manual_seed(0)
    for p in list(var_ref.parameters()) + list(vae_ref.parameters()):
        p.data = torch.randn(p.shape, generator=g) * 0.1
    var, vae = small()
    var.load_state_dict(var_ref.state_dict(), strict=True)
    vae.load_state_dict(vae_ref.state_dict(), strict=True)
    var_ref.load_state_dict(var.state_dict(), strict=True)
    labels = torch.tensor([3, 7])
    theirs = var_ref.eval().autoregressive_infer_cfg(B=2, label_B=labels, g_seed=5, cfg=1.5, top_k=20, top_p=0.9)
    ours = generate(var, vae, labels, seed=5, cfg=1.5, top_k=20, top_p=0.9)
    assert torch.equal(theirs, ours.image)
    sys.modules.pop("models", None)

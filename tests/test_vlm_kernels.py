"""GUI-KV and ZipVL scoring kernels on hand-made tensors with known answers.

:func:`methods.guikv.guikv_scores` + top-k was also run against the authors' ``GUIKVCluster.update_kv`` (GUI-KV @
b301d41) on 40 random layers with 4 screenshots (partly duplicated keys), 4 heads each: identical kept sets."""

from __future__ import annotations

import math

import pytest
import torch

from kvbench.ops import Workspace
from methods import guikv, zipvl


def test_spatial_saliency_is_alpha_softmax_of_zscored_norms() -> None:
    hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])  # norms 1, 2, 3 -> z = -1, 0, 1 (unbiased std 1)
    got = guikv.spatial_saliency(hidden, alpha=2.0, temperature=3.5)
    want = 2.0 * torch.softmax(torch.tensor([-1.0, 0.0, 1.0]) / 3.5, dim=0)
    assert torch.allclose(got, want) and got.sum().item() == pytest.approx(2.0)


def two_subspace_keys(m: int = 100, d: int = 64) -> torch.Tensor:
    """Current-screenshot keys (full rank, as real keys): tokens 0-49 random in a 32-dim subspace A, tokens 50-99
    three times larger in an 8-dim subspace B orthogonal to A (B dominates the principal subspace)."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(d, 40, generator=gen))[0]  # [d, 40] orthonormal
    keys = torch.zeros(m, d)
    keys[: m // 2] = torch.randn(m // 2, 32, generator=gen) @ basis[:, :32].T
    keys[m // 2:] = 3 * torch.randn(m - m // 2, 8, generator=gen) @ basis[:, 32:].T
    return keys


def test_qr_basis_spans_the_first_tokens_and_a_duplicate_there_has_residual_zero() -> None:
    keys = two_subspace_keys()
    b = guikv.qr_basis(keys, rank=32)
    assert b.shape == (64, 32) and torch.allclose(b.T @ b, torch.eye(32), atol=1e-5)
    prev = torch.stack([keys[3], keys[80], 2.5 * keys[10]])  # duplicates of current tokens #3, #80, a scaled #10
    res = guikv.residual_norms(prev, b)
    assert res[0].item() == pytest.approx(0.0, abs=1e-4) and res[2].item() == pytest.approx(0.0, abs=1e-4)
    # token #80 lies outside the span of the first 32 tokens: the authors' basis does not explain it at all
    assert res[1].item() == pytest.approx(keys[80].norm().item(), rel=1e-4)
    svd = guikv.residual_norms(prev, guikv.svd_basis(keys, rank=32))  # the flagged deviation: principal subspace
    assert svd[1].item() == pytest.approx(0.0, abs=1e-3) and svd[0].item() > 0.1  # B explained, A only in part


def test_zero_redundant_drops_the_smallest_residuals() -> None:
    assert guikv.n_redundant(0.1, 10) == 9 and guikv.n_redundant(1.0, 10) == 0
    scores = torch.arange(1.0, 9.0)
    out = guikv.zero_redundant(scores, torch.tensor([1, 2, 5]), torch.tensor([0.5, 3.0, 0.0]), 2)
    assert out.tolist() == [1, 0, 3, 4, 5, 0, 7, 8] and scores[1] == 2  # positions 5 (0.0) and 1 (0.5); a copy


def test_guikv_scores_combine_saliency_and_redundancy_per_head() -> None:
    d, n = 8, 12
    keys = torch.zeros(2, n, d)
    keys[:, 6:10] = torch.eye(d)[:4]  # current screenshot [6, 10): 4 keys e0..e3
    keys[0, 0:4] = torch.stack([torch.eye(d)[0], torch.eye(d)[5], torch.eye(d)[1], torch.eye(d)[6]])  # head 0
    keys[1, 0:4] = torch.eye(d)[4:8]  # head 1: nothing redundant
    hidden = torch.ones(n, 4)
    hidden[7] *= 5.0  # the salient current token
    scores = torch.full((2, 10), 1.0)  # n' = 10 scored tokens (window 2)
    out = guikv.guikv_scores(scores, hidden, keys, [(0, 4), (6, 10)], budget_fraction=0.5, rank=4)
    assert out[0, :4].tolist() == [0.0, 1.0, 0.0, 1.0]  # int(0.5 * 4) = 2 zeroed: the duplicates of e0 and e1
    assert (out[1, :4] == 1).sum() == 2  # head 1: two tokens zeroed (ties), nothing explained
    sal = guikv.spatial_saliency(hidden[6:10])
    assert torch.allclose(out[:, 6:10], 1 + sal.expand(2, 4)) and out[0, 7] == out[0, 6:10].max()
    assert (out[:, 4:6] == 1).all()  # text between the screenshots untouched


def test_zipvl_uniform_scores_keep_tau_and_peaked_ones_few() -> None:
    for n in (40, 1000):
        assert zipvl.adaptive_ratio(torch.ones(n), tau=0.975) == pytest.approx(0.975)
    peaked = torch.tensor([0.98] + [0.02 / 99] * 99)
    assert zipvl.adaptive_count(peaked, tau=0.975) == 1 and zipvl.adaptive_ratio(peaked) == pytest.approx(0.01)
    two = torch.tensor([0.5, 0.3, 0.1, 0.1])
    assert zipvl.adaptive_count(two, tau=0.8) == 2 and zipvl.adaptive_count(two, tau=0.81) == 3
    assert zipvl.important_mask(two, 2).tolist() == [True, True, False, False]


def test_zipvl_probe_attention_is_causally_normalised() -> None:
    q = torch.zeros(2, 3, 4)  # 2 query heads, 1 KV head: zero logits, uniform causal attention
    k = torch.zeros(1, 3, 4)
    got = zipvl.probe_scores(q, k, torch.tensor([0, 1, 2]))
    # column sums 1 + 1/2 + 1/3, 1/2 + 1/3, 1/3 over 3, 2, 1 probes that can see each token
    want = torch.tensor([[(1 + 1 / 2 + 1 / 3) / 3, (1 / 2 + 1 / 3) / 2, 1 / 3]])
    assert torch.allclose(got, want)
    late = zipvl.probe_scores(q, k, torch.tensor([2]))  # one probe at the end sees everything
    assert torch.allclose(late, torch.full((1, 3), 1 / 3))
    k2 = torch.zeros(1, 3, 4)
    k2[0, 1, 0] = 10.0
    q2 = torch.zeros(2, 3, 4)
    q2[0, :, 0] = 1.0  # head 0 attends to token 1, head 1 uniform: the KV head's score is their mean
    s = zipvl.probe_scores(q2, k2, torch.tensor([2]), scale=1.0)
    e = math.exp(10.0)
    assert torch.allclose(s[0], (torch.tensor([1, e, 1]) / (e + 2) + 1 / 3) / 2)


def out_of_place_probe_attention(probe_queries, keys, probes, scale):
    """The probe attention written out of place (the code before the in-place rewrite)."""
    h_q, h_kv, n = probe_queries.shape[0], keys.shape[0], keys.shape[1]
    k = keys.float().repeat_interleave(h_q // h_kv, dim=0)
    logits = probe_queries.float() @ k.transpose(1, 2) * scale
    visible = probes[:, None] >= torch.arange(n)[None, :]
    attn = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return (attn.sum(1) / visible.sum(0).clamp(min=1)).view(h_kv, h_q // h_kv, n).mean(1)


def test_zipvl_probe_attention_in_place_equals_out_of_place_bit_for_bit() -> None:
    gen, work = torch.Generator().manual_seed(0), Workspace()  # one buffer, grown and shrunk across the shapes
    for h_q, h_kv, n, p, dtype in [(4, 2, 300, 40, torch.float32), (8, 2, 1000, 128, torch.float32),
                                   (2, 1, 50, 50, torch.bfloat16), (4, 4, 700, 9, torch.float16)]:
        q, k = torch.randn(h_q, n, 16, generator=gen).to(dtype), torch.randn(h_kv, n, 16, generator=gen).to(dtype)
        probes = zipvl.probe_positions(n, p // 2, p - p // 2, torch.Generator().manual_seed(n))
        want = out_of_place_probe_attention(q[:, probes], k, probes, 0.25)
        assert torch.equal(zipvl.probe_attention(q[:, probes], k, probes, 0.25), want)
        assert torch.equal(zipvl.probe_attention(q[:, probes], k, probes, 0.25, work), want), (n, p)


def test_zipvl_probe_positions() -> None:
    pos = zipvl.probe_positions(200, generator=torch.Generator().manual_seed(0))
    assert pos.numel() == 128 and pos.unique().numel() == 128 and (pos[-64:] == torch.arange(136, 200)).all()
    assert torch.equal(zipvl.probe_positions(50), torch.arange(50))


def test_gqa_variant_reduces_over_each_kv_group() -> None:
    scores = torch.tensor([[1.0, 4.0], [3.0, 2.0], [0.0, 1.0], [5.0, 0.0]])  # 4 query heads, 2 KV heads
    assert guikv.group_scores(scores, 2).tolist() == [[3.0, 4.0], [5.0, 1.0]]
    assert guikv.group_scores(scores, 2, "mean").tolist() == [[2.0, 3.0], [2.5, 0.5]]


def test_zipvl_attention_flops_saved() -> None:
    assert zipvl.attention_flops_saved([975], 1000) == pytest.approx(1 - 0.975**2)
    assert zipvl.attention_flops_saved([100, 1000], 1000) == pytest.approx(1 - (0.01 + 1) / 2)

"""Infinity on the next-scale runner: bitwise tokens, the T5 condition, cross-attention, 2-D RoPE, the scale
schedule, the released checkpoint's names, and the embedded kvbench-tiny-infinity."""

from __future__ import annotations

import math

import pytest
import torch

from kvbench.errors import UsageError
from kvbench.var.infinity.bsq import BSQ, MultiScaleBSQ, flip_bits
from kvbench.var.infinity.generate import generate_infinity, sample_bits
from kvbench.var.infinity.load import TRAINING_BUFFERS, load_embedded, released_state
from kvbench.var.infinity.model import CrossAttention, Infinity, InfinityConfig
from kvbench.var.infinity.rope import apply_rope, grid_positions, rope_tables
from kvbench.var.infinity.schedule import rope_extent, scale_sides
from kvbench.var.infinity.text import pretrained_t5

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest)
PROMPTS = ["a red cube on a table", "a photo of a cat", "a lighthouse at sunset"]


@pytest.fixture(scope="module")
def tiny():
    return load_embedded("kvbench-tiny-infinity")


def test_scale_schedules_are_infinitys_1_1_template() -> None:
    assert scale_sides("1:1", "0.06M") == (1, 2, 4, 6, 8, 12, 16)  # 256 px
    assert scale_sides("1:1", "0.25M")[-1] == 32 and len(scale_sides("1:1", "1M")) == 13  # 512 / 1024 px
    assert sum(s * s for s in scale_sides("1:1", "1M")) == 10521 and rope_extent("1:1") == 64
    assert scale_sides("1:1", "0.06M", n_scales=5) == (1, 2, 4, 6, 8)
    with pytest.raises(UsageError, match="not implemented"):
        scale_sides("16:9", "1M")
    with pytest.raises(UsageError, match="pn="):
        scale_sides("1:1", "2M")


def test_rope_positions_and_rotation_on_a_hand_case() -> None:
    """Star mode: a scale of side s spreads its tokens over the 64-grid; pair 0 turns by the row, pair 2 by the
    column (head dim 8: inv_freq 1 and 1/100 per axis)."""
    assert grid_positions(2, 64, 2).tolist() == [[0, 0], [0, 32], [32, 0], [32, 32]]
    assert grid_positions(6, 64, 2)[::6, 0].tolist() == [0, 11, 21, 32, 43, 53]
    assert grid_positions(3, 64, 0)[:, 1].tolist() == [0, 1, 2] * 3
    cos, sin = rope_tables(8, (1, 2), 64)[1]  # scale 1 (side 2)
    x = torch.zeros(4, 8)
    x[:, 0] = x[:, 2] = x[:, 4] = 1.0  # the first channel of pairs 0, 1, 2
    out = apply_rope(x, cos, sin)  # token 2 = (row 32, col 0), token 1 = (row 0, col 32)
    assert torch.allclose(out[2, :2], torch.tensor([math.cos(32), math.sin(32)]), atol=1e-6)
    assert torch.allclose(out[2, 2:4], torch.tensor([math.cos(0.32), math.sin(0.32)]), atol=1e-6)
    assert torch.equal(out[2, 4:6], torch.tensor([1.0, 0.0])), "column 0: the column pairs do not turn"
    assert torch.allclose(out[1, 4:6], torch.tensor([math.cos(32), math.sin(32)]), atol=1e-6)
    assert torch.equal(out[0], x[0]), "the origin does not turn"
    with pytest.raises(UsageError, match="only 0 and 2"):
        grid_positions(2, 64, 1)


def test_rope_scores_depend_on_the_grid_distance_only() -> None:
    """Aligned tokens of two scales share a position, so their post-RoPE score is the raw one."""
    (c1, s1), (c2, s2) = rope_tables(16, (2, 4), 64)
    q, k = torch.randn(16), torch.randn(16)
    a = apply_rope(q.expand(4, -1), c1, s1)[3] @ apply_rope(k.expand(16, -1), c2, s2)[10]  # (32, 32) both
    assert torch.allclose(a, q @ k, atol=1e-5)


class Capture:
    def attend(self, block_idx, q, k, v, scale):
        self.q, self.k = q, k
        return torch.zeros_like(v)


def test_the_cache_receives_post_rope_keys(tiny) -> None:
    model = tiny[0]
    sa, rope = model.layers[0].sa, rope_tables(16, (1, 2, 4), 64)[2]
    x, kv = torch.randn(2, 16, 64), Capture()
    sa(x, kv, rope)
    q, k, _ = sa.qkv(x)
    assert torch.equal(kv.k, apply_rope(k, *rope)) and torch.equal(kv.q, apply_rope(q, *rope))
    assert not torch.allclose(kv.k, k)


def test_bitwise_codes_labels_and_residual_quantisation() -> None:
    bsq = BSQ(3)
    assert bsq.bits_to_int(torch.tensor([[1, 0, 1], [0, 1, 1]])).tolist() == [5, 3]
    codes = bsq.bits_to_codes(torch.tensor([[1, 0, 1]]))
    assert torch.allclose(codes, torch.tensor([[1.0, -1.0, 1.0]]) / math.sqrt(3))
    assert torch.allclose(codes.norm(), torch.tensor(1.0))
    q = MultiScaleBSQ(8, (1, 2, 4, 8))
    f = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    bits = q.f_to_bits(f)
    assert [b.shape for b in bits] == [(2, s * s, 8) for s in (1, 2, 4, 8)]
    f_hat, errs = torch.zeros_like(f), []
    for si, b in enumerate(bits):
        q.add_scale(si, f_hat, b)
        errs.append(float((f - f_hat).pow(2).mean()))
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.6 * float(f.pow(2).mean()), errs
    g = torch.Generator().manual_seed(0)
    assert torch.equal(flip_bits(bits[2], 0.0, g), bits[2]) and torch.equal(flip_bits(bits[2], 1.0, g), 1 - bits[2])


def test_bit_agreement_counts_equal_bits() -> None:
    from kvbench.var.metrics import bit_agreement, token_agreement

    a, b = [torch.tensor([[5, 3]])], [torch.tensor([[5, 0]])]  # 101 = 101; 011 vs 000: one of three bits equal
    assert torch.allclose(bit_agreement(a, b, 3), torch.tensor([4 / 6])) and token_agreement(a, b).item() == 0.5


def test_bitwise_head_samples_each_bit_from_its_two_logits() -> None:
    logits = torch.tensor([[[10.0, -10.0, -10.0, 10.0]]])  # one token, d = 2: bit 0 -> 0, bit 1 -> 1
    assert sample_bits(logits, 900, 0.97, torch.Generator().manual_seed(0)).tolist() == [[[0, 1]]]


def test_text_cross_attention_with_padding_equals_each_text_alone() -> None:
    """The varlen flash-attn path becomes SDPA with a key-padding mask: exact."""
    torch.manual_seed(0)
    ca = CrossAttention(32, 16, 4)
    text, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    x = torch.randn(2, 7, 32)
    both = ca(x, ca.kv(text), mask)
    alone = ca(x[:1], ca.kv(text[:1, :3]), mask[:1, :3])
    assert torch.allclose(both[:1], alone, atol=1e-6)


def test_sampler_is_deterministic_under_a_seed(tiny) -> None:
    a = generate_infinity(*tiny, PROMPTS, seed=3)
    b = generate_infinity(*tiny, PROMPTS, seed=3)
    c = generate_infinity(*tiny, PROMPTS, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens, strict=True)) and torch.equal(a.image, b.image)
    assert any(not torch.equal(x, y) for x, y in zip(a.tokens, c.tokens, strict=True))
    assert a.image.shape == (3, 3, 32, 32) and [t.shape[1] for t in a.tokens] == [1, 4, 16, 36, 64]


def test_the_t5_condition_changes_the_output(tiny) -> None:
    """Same seed: another prompt gives other logits from the first scale on; the same prompt the same ones."""
    out = generate_infinity(*tiny, ["a red cube", "a red cube", "a blue sky over the sea"], seed=0, keep_logits=True)
    first = out.logits[0]  # (3, 1, 16), before any sampling
    assert torch.equal(first[0], first[1]) and not torch.allclose(first[0], first[2], atol=1e-3)
    assert (out.image[0] - out.image[2]).abs().mean() > 0.05


def test_bytes_of_both_cfg_streams_and_of_the_text_kv(tiny) -> None:
    model, vae, text = tiny
    out = generate_infinity(model, vae, text, PROMPTS, seed=0)
    c, b, n = model.cfg, len(PROMPTS), sum(s * s for s in vae.quantizer.sides)
    assert out.cache.rows == 2 * b * c.num_heads, "both CFG streams are rows of the cache"
    assert out.cache.nbytes() == out.cache.peak_bytes == c.depth * 2 * (2 * b * c.num_heads * n * c.head_dim * 4)
    t = text.encode(PROMPTS)[1].shape[1]  # the longest prompt's tokens (bytes + </s>)
    assert t == len(PROMPTS[2]) + 1
    assert out.cache.condition_bytes == c.depth * 2 * (2 * b * c.num_heads * t * c.head_dim * 4)


def released_keys(cfg: InfinityConfig) -> dict[str, tuple[int, ...]]:
    """The released checkpoint's names and shapes, written down from the authors' modules (not from ours)."""
    c, t5, h, d, bits = cfg.embed_dim, cfg.text_channels, cfg.num_heads, cfg.head_dim, cfg.bits
    ph = t5 // cfg.pool_head_dim
    hidden = round(c * cfg.mlp_ratio / 256) * 256
    keys = {"cfg_uncond": (cfg.text_maxlen, t5), "text_norm.weight": (t5,),
            "text_proj_for_sos.ca.mat_q": (1, ph, c // ph), "text_proj_for_sos.ca.mat_kv.weight": (2 * c, t5),
            "text_proj_for_sos.ca.v_bias": (c,), "text_proj_for_sos.ca.zero_k_bias": (c,),
            "text_proj_for_sos.ca.proj.weight": (c, c), "text_proj_for_sos.ca.proj.bias": (c,),
            "text_proj_for_ca.0.weight": (c, t5), "text_proj_for_ca.0.bias": (c,),
            "text_proj_for_ca.2.weight": (c, c), "text_proj_for_ca.2.bias": (c,),
            "pos_start": (1, 1, c), "lvl_embed.weight": (15, c), "word_embed.weight": (c, bits),
            "word_embed.bias": (c,), "shared_ada_lin.1.weight": (6 * c, c), "shared_ada_lin.1.bias": (6 * c,),
            "head_nm.ada_lin.1.weight": (2 * c, c), "head_nm.ada_lin.1.bias": (2 * c,),
            "head.weight": (2 * bits, c), "head.bias": (2 * bits,)}
    per = cfg.depth // cfg.block_chunks
    for i in range(cfg.depth):
        p = f"block_chunks.{i // per}.module.{i % per}."
        keys |= {p + "sa.mat_qkv.weight": (3 * c, c), p + "sa.q_bias": (c,), p + "sa.v_bias": (c,),
                 p + "sa.zero_k_bias": (c,), p + "sa.scale_mul_1H11": (1, h, 1, 1), p + "sa.proj.weight": (c, c),
                 p + "sa.proj.bias": (c,), p + "ca.mat_q.weight": (c, c), p + "ca.mat_q.bias": (c,),
                 p + "ca.mat_kv.weight": (2 * c, c), p + "ca.v_bias": (c,), p + "ca.zero_k_bias": (c,),
                 p + "ca.proj.weight": (c, c), p + "ca.proj.bias": (c,), p + "ffn.fc1.weight": (hidden, c),
                 p + "ffn.fc1.bias": (hidden,), p + "ffn.fc2.weight": (c, hidden), p + "ffn.fc2.bias": (c,),
                 p + "ca_norm.weight": (c,), p + "ca_norm.bias": (c,), p + "ada_gss": (1, 1, 6, c)}
    assert d * h == c
    return keys


def test_infinity_2b_has_the_released_names_and_size() -> None:
    cfg = InfinityConfig()
    with torch.device("meta"):
        model = Infinity(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == released_keys(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 2.0e9 < n < 2.3e9, n  # "2B"
    assert cfg.head_dim == 128 and cfg.mlp_hidden == 8192 and len(model.layers) == 32


def test_a_scaled_down_released_state_dict_loads_strictly() -> None:
    """Built from the released names and shapes (scaled down), with the training buffers the authors' loader
    drops and a cfg_uncond of another length (cut to text_maxlen)."""
    cfg = InfinityConfig(depth=4, embed_dim=64, num_heads=4, text_channels=32, text_maxlen=16, bits=8,
                         block_chunks=2, pool_head_dim=16)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) for k, s in released_keys(cfg).items()}
    state["cfg_uncond"] = torch.randn(20, 32, generator=g)
    state |= {name: torch.zeros(3) for name in TRAINING_BUFFERS}
    model = Infinity(cfg)
    model.load_state_dict(released_state(state, model), strict=True)
    assert torch.equal(model.layers[3].sa.mat_qkv.weight, state["block_chunks.1.module.1.sa.mat_qkv.weight"])
    assert torch.equal(model.cfg_uncond, state["cfg_uncond"][:16])


def test_released_files_and_text_encoder_are_one_clear_error(tmp_path) -> None:
    from omegaconf import OmegaConf

    from kvbench.var.infinity.load import load_infinity

    with pytest.raises(UsageError, match="not found"):
        load_infinity(OmegaConf.create({"pretrained": str(tmp_path / "infinity_2b_reg.pth")}))
    with pytest.raises(UsageError, match="could not be loaded"):
        pretrained_t5(str(tmp_path / "flan-t5-xl"), None, "cpu")

"""GPU checks (marker ``gpu``; skipped without CUDA): the engine's bf16 paths agree with the exact fp32 path.

Run on a GPU node with ``pytest -m gpu tests/test_gpu.py``. They check that prefill and decode through SDPA (and
through flash-attn's ``flash_attn_varlen_func`` when it is installed) match the eager reference on ragged caches,
and that SDPA really dispatches to its FlashAttention kernel for the unmasked prefill.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, load_method

from kvbench.engine import Engine
from kvbench.engine.attention import causal_attention, flash_attn_available

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BACKENDS = ["sdpa"] + (["flash_attention_2"] if flash_attn_available() else [])


def decode_logits(model, name: str, backend: str, ids: torch.Tensor, steps: int = 4) -> torch.Tensor:
    method, allocator = load_method(name)
    with Engine(model, method, allocator, budget=0.3, backend=backend) as eng:
        eng.reset()
        out = [eng.forward(ids, compress=True)]
        for _ in range(steps):
            out.append(eng.forward([int(out[-1].argmax())]))
    return torch.stack(out).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["snapkv", "adakv", "defensivekv"])
def test_bf16_backends_match_eager(name: str, backend: str) -> None:
    model = build_model("llama", seed=1).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(0)).cuda()
    ref = decode_logits(model, name, "eager", ids)
    got = decode_logits(model, name, backend, ids)
    assert (got[0] - ref[0]).abs().max() < 0.1  # bf16 prefill
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_sdpa_prefill_uses_the_flash_kernel() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if SDPA cannot use FlashAttention here
        out = causal_attention(q, k, k, 64**-0.5, "sdpa")
    assert out.shape == (1, 256, 8, 64)

"""Building Infinity models: the embedded tiny model (``embedded:kvbench-tiny-infinity``) or a released transformer.

``embedded:<name>``: ``kvbench/assets/<name>/{config.json, model.safetensors}`` with the prefixes ``infinity.``
(the transformer), ``vae.`` (the bit tokenizer) and ``t5.`` (the tiny T5 encoder; its tokenizer is ``ByT5Tokenizer``).
Released: ``model.pretrained`` = ``infinity_2b_reg.pth`` loads strictly into ``Infinity(InfinityConfig())`` after
``released_state`` (the authors' ``load_state_dict`` drops the training buffers ``lvl_1L``,
``attn_bias_for_masking``, ``Infinity_visible_kvlen``, ``Infinity_invisible_qlen`` and fits ``cfg_uncond`` to
``text_maxlen``); its tokenizer ``model.vae`` = ``infinity_vae_d32_reg.pth`` (the ``vae`` entry, as the authors'
``vae_model`` loads it) strictly into ``BitVAE(released_vae_config(...))`` after ``released_vae_state``; the text
encoder ``model.text_encoder`` (``google/flan-t5-xl`` at a pinned revision, or a local folder) through transformers.
Every file is checked to exist before the multi-GB transformer is read.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from kvbench.errors import UsageError
from kvbench.var.infinity.bsq import BitVAE, BitVAEConfig, released_vae_config, released_vae_state
from kvbench.var.infinity.model import Infinity, InfinityConfig
from kvbench.var.infinity.schedule import scale_sides
from kvbench.var.infinity.text import TextEncoder, byte_tokenizer, pretrained_t5, tiny_t5
from kvbench.var.load import ASSETS

TRAINING_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def save_embedded(model: Infinity, vae: BitVAE, t5: Any, schedule: dict[str, Any], folder: Path,
                  meta: dict[str, Any]) -> None:
    """config.json + model.safetensors in fp16 (loaded back as fp32); tied T5 weights are stored once each."""
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"infinity": model.state_dict(), "vae": vae.state_dict(), "t5": t5.state_dict()}
    state = {f"{p}.{k}": (v.half() if v.is_floating_point() else v).clone().contiguous()
             for p, sd in parts.items() for k, v in sd.items()}
    save_file(state, str(folder / "model.safetensors"))
    t5_spec = {k: v for k, v in t5.config.to_diff_dict().items() if k in T5_KEYS}
    spec = {"infinity": asdict(model.cfg), "vae": asdict(vae.cfg), "schedule": schedule, "t5": t5_spec, **meta}
    (folder / "config.json").write_text(json.dumps(spec, indent=1) + "\n")


T5_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "feed_forward_proj",
           "relative_attention_num_buckets", "relative_attention_max_distance", "dropout_rate", "layer_norm_epsilon")


def build(spec: dict[str, Any]) -> tuple[Infinity, BitVAE, tuple[int, ...]]:
    cfg, vae_cfg = InfinityConfig(**_tuples(spec["infinity"])), BitVAEConfig(**_tuples(spec["vae"]))
    sides = scale_sides(**spec["schedule"])
    if cfg.bits != vae_cfg.bits:
        raise UsageError(f"the transformer predicts {cfg.bits} bits, the tokenizer has {vae_cfg.bits}")
    return Infinity(cfg).eval(), BitVAE(vae_cfg, sides).eval(), sides


def part(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) + 1 :]: v.float() if v.is_floating_point() else v for k, v in state.items()
            if k.startswith(prefix + ".")}


def load_embedded(name: str, device: str | torch.device = "cpu") -> tuple[Infinity, BitVAE, TextEncoder]:
    folder = ASSETS / name
    if not (folder / "model.safetensors").exists():
        raise UsageError(f"no embedded Infinity model {name!r} in {ASSETS} (build it: "
                         "python scripts/build_tiny_infinity.py)")
    spec = json.loads((folder / "config.json").read_text())
    model, vae, _ = build(spec)
    t5 = tiny_t5(spec["t5"])
    state = load_file(str(folder / "model.safetensors"))
    model.load_state_dict(part(state, "infinity"), strict=True)
    vae.load_state_dict(part(state, "vae"), strict=True)
    t5.load_state_dict(part(state, "t5"), strict=True)
    text = TextEncoder(byte_tokenizer(), t5.to(device), max_tokens=model.cfg.text_maxlen)
    return model.to(device), vae.to(device), text


def released_state(state: dict[str, Tensor], model: Infinity) -> dict[str, Tensor]:
    """A released checkpoint's state dict as ``model`` loads it strictly: training buffers dropped and
    ``cfg_uncond`` cut or padded (with the model's own rows) to ``text_maxlen``, as the authors' loader does."""
    state = {k: v for k, v in state.items() if k not in TRAINING_BUFFERS}
    old, new = state["cfg_uncond"], model.cfg_uncond.data
    n = min(len(old), len(new))
    state["cfg_uncond"] = torch.cat([old[:n].to(new.dtype), new[n:]])
    return state


def load_released(spec: Any, device: str | torch.device = "cpu") -> tuple[Infinity, BitVAE, TextEncoder]:
    path, vae_path = str(spec.pretrained), spec.get("vae")
    if not Path(path).is_file():
        raise UsageError(f"Infinity checkpoint {path!r} not found: download infinity_2b_reg.pth (hub "
                         "FoundationVision/Infinity) and set model.pretrained")
    if vae_path is None or not Path(str(vae_path)).is_file():
        raise UsageError(f"Infinity tokenizer {vae_path!r} not found: download infinity_vae_d32_reg.pth (hub "
                         "FoundationVision/Infinity) and set model.vae")
    sides = scale_sides(str(spec.get("h_div_w", "1:1")), str(spec.get("pn", "1M")))  # one message for a bad one
    vae = load_released_vae(str(vae_path), sides)
    model = Infinity(InfinityConfig()).eval()
    if model.cfg.bits != vae.cfg.bits:
        raise UsageError(f"{path} predicts {model.cfg.bits} bits per token, the tokenizer {vae_path} has "
                         f"{vae.cfg.bits}: use the tokenizer released with the transformer")
    text = pretrained_t5(str(spec.text_encoder), spec.get("text_encoder_revision"), device)  # before the big read
    model.load_state_dict(released_state(torch.load(path, map_location="cpu", weights_only=True), model), strict=True)
    return model.to(device), vae.to(device), text


def load_released_vae(path: str, sides: tuple[int, ...]) -> BitVAE:
    """A released Infinity tokenizer file (``{"vae": state dict}``, or the state dict itself) as a ``BitVAE``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("vae", state) if isinstance(state, dict) else state
    vae = BitVAE(released_vae_config(state), sides).eval()
    mapped = released_vae_state(state, vae)
    ours = vae.state_dict()
    missing, unexpected = sorted(set(ours) - set(mapped)), sorted(set(mapped) - set(ours))
    wrong = [k for k in set(ours) & set(mapped) if ours[k].shape != mapped[k].shape]
    if missing or unexpected or wrong:
        raise UsageError(f"{path} is not an Infinity tokenizer kvbench can load ({vae.cfg}): missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}, other shapes {sorted(wrong)[:3]}")
    vae.load_state_dict(mapped, strict=True)
    return vae


def load_infinity(spec: Any, device: str | torch.device = "cpu") -> tuple[Infinity, BitVAE, TextEncoder]:
    """From a ``conf/model`` node with ``arch: infinity``."""
    pretrained = str(spec.pretrained)
    if pretrained.startswith("embedded:"):
        return load_embedded(pretrained.removeprefix("embedded:"), device)
    return load_released(spec, device)

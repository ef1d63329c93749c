"""Building VAR models: the embedded tiny model (``embedded:kvbench-tiny-var``) or the released checkpoints.

``model.pretrained`` is ``embedded:<name>`` (``kvbench/assets/<name>/{config.json, model.safetensors}``) or the
path of a released transformer checkpoint ``var_d{16,20,24,30}.pth`` with ``model.vae`` the path of
``vae_ch160v4096z32.pth`` (FoundationVision/VAR's files, loaded strictly into our modules; ``model.depth`` must
match the file, e.g. 30 for ``var_d30.pth``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kvbench.errors import UsageError
from kvbench.var.model import VAR, VARConfig
from kvbench.var.quant import VQVAE, VAEConfig

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def build(var_cfg: VARConfig, vae_cfg: VAEConfig) -> tuple[VAR, VQVAE]:
    """Modules in eval mode (weights as initialised by torch; load or write them next)."""
    if var_cfg.patch_nums != vae_cfg.patch_nums or var_cfg.vocab_size != vae_cfg.vocab_size \
            or var_cfg.z_channels != vae_cfg.z_channels:
        raise UsageError("the VAR and VQVAE configs disagree on patch_nums, vocab_size or z_channels")
    return VAR(var_cfg).eval(), VQVAE(vae_cfg).eval()


def configs(spec: dict[str, Any]) -> tuple[VARConfig, VAEConfig]:
    """{"var": {...}, "vae": {...}} (config.json) -> configs; lists become tuples."""
    tup = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["var"].items()}
    vae = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["vae"].items()}
    return VARConfig(**tup), VAEConfig(**vae)


def save_embedded(var: VAR, vae: VQVAE, folder: Path, meta: dict[str, Any], half: bool = True) -> None:
    """config.json + model.safetensors ("var." / "vae." prefixes; fp16 when ``half``, loaded back as fp32)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"var.{k}": v for k, v in var.state_dict().items()} | {f"vae.{k}": v for k, v in vae.state_dict().items()}
    state = {k: (v.half() if half and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    state = {k: v for k, v in state.items() if k != "var.attn_bias_for_masking"}  # rebuilt from patch_nums
    save_file(state, str(folder / "model.safetensors"))
    spec = {"var": asdict(var.cfg), "vae": asdict(vae.cfg), **meta}
    (folder / "config.json").write_text(json.dumps(spec, indent=1) + "\n")


def load_embedded(name: str, device: str | torch.device = "cpu") -> tuple[VAR, VQVAE]:
    folder = ASSETS / name
    if not (folder / "model.safetensors").exists():
        raise UsageError(f"no embedded VAR model {name!r} in {ASSETS} (build it: python scripts/build_tiny_var.py)")
    var, vae = build(*configs(json.loads((folder / "config.json").read_text())))
    state = load_file(str(folder / "model.safetensors"))
    _load(var, {k[4:]: v.float() for k, v in state.items() if k.startswith("var.")}, keep=("attn_bias_for_masking",))
    _load(vae, {k[4:]: v.float() for k, v in state.items() if k.startswith("vae.")})
    return var.to(device), vae.to(device)


def _load(module: nn.Module, state: dict[str, torch.Tensor], keep: tuple[str, ...] = ()) -> None:
    own = module.state_dict()
    state = state | {k: own[k] for k in keep}
    module.load_state_dict(state, strict=True)


def load_released(var_path: str, vae_path: str, depth: int, device: str | torch.device = "cpu",
                  patch_nums: tuple[int, ...] = VARConfig.patch_nums) -> tuple[VAR, VQVAE]:
    """``var_d{depth}.pth`` + ``vae_ch160v4096z32.pth`` (FoundationVision/VAR) loaded strictly."""
    for path in (var_path, vae_path):
        if not Path(path).is_file():
            raise UsageError(f"VAR checkpoint {path!r} not found: download var_d{depth}.pth and vae_ch160v4096z32.pth "
                             "from the VAR release (hub FoundationVision/var) and set model.pretrained / model.vae")
    var, vae = build(VARConfig.released(depth, patch_nums=patch_nums), VAEConfig(patch_nums=patch_nums))
    vae_state = torch.load(vae_path, map_location="cpu", weights_only=True)
    if vae_state["quantize.ema_vocab_hit_SV"].shape != vae.quantize.ema_vocab_hit_SV.shape:  # other schedule
        vae_state["quantize.ema_vocab_hit_SV"] = vae.quantize.ema_vocab_hit_SV
    vae.load_state_dict(vae_state, strict=True)
    var.load_state_dict(torch.load(var_path, map_location="cpu", weights_only=True), strict=True)
    return var.to(device), vae.to(device)


def load_model(spec: Any, device: str | torch.device = "cpu") -> tuple[VAR, VQVAE]:
    """From a ``conf/model`` node with ``family: var``."""
    pretrained = str(spec.pretrained)
    if pretrained.startswith("embedded:"):
        return load_embedded(pretrained.removeprefix("embedded:"), device)
    if spec.get("vae") is None or spec.get("depth") is None:
        raise UsageError("a released VAR checkpoint needs model.vae (vae_ch160v4096z32.pth) and model.depth")
    return load_released(pretrained, str(spec.vae), int(spec.depth), device)

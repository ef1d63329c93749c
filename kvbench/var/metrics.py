"""Image-generation metrics of the VAR runner.

Offline, always (agreement with the full-cache generation of the same seed):
* ``token_agreement``: per scale, the fraction of the scale's tokens equal to the reference's (for Infinity's
  bitwise tokens: all d bits equal), and for bitwise tokens ``bit_agreement``, the fraction of equal bits.
* ``psnr``: 10 log10(1 / MSE) of [0, 1] images (scikit-image's ``peak_signal_noise_ratio``, data_range 1); identical
  images are reported as ``PSNR_IDENTICAL`` dB (the MSE is 0) and counted in ``identical_images``.
* ``ssim``: scikit-image's ``structural_similarity`` (Wang et al. 2004; 7 x 7 uniform window, K1 0.01, K2 0.03,
  data_range 1, mean over the RGB channels).

Distribution metrics against real images (FID, IS, precision/recall) need torch-fidelity and its Inception
weights: ``fidelity_metrics`` computes them when those load and otherwise raises one ``UsageError`` naming what is
missing (torch-fidelity needs torchvision, which has no build for this CPU torch here, so it is not installed).

Text-image agreement for text-conditioned models (Infinity): ``clip_score``, CLIPScore (Hessel et al. 2021) as
torchmetrics defines it, ``100 * max(cos(E_image, E_text), 0)`` with transformers' ``CLIPModel`` /
``CLIPProcessor`` (``task.clip_model``: ``openai/clip-vit-large-patch14``, torchmetrics' default, from a local
folder or the hub cache). Deviation: computed with transformers directly, not through torchmetrics'
``CLIPScore`` (1.9 calls ``get_image_features`` and expects a tensor, which transformers 5 no longer returns; and
open_clip needs torchvision). GenEval: :mod:`kvbench.var.geneval`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kvbench.errors import UsageError

PSNR_IDENTICAL = 100.0
OFFLINE = ("token_agreement", "psnr", "ssim")
DISTRIBUTION = ("fid", "inception_score", "precision_recall")
TEXT = ("clip_score", "geneval")  # need the prompts: text-conditioned models only (geneval: kvbench.var.geneval)


def token_agreement(tokens: list[Tensor], ref: list[Tensor]) -> Tensor:
    """Per scale (S,) fraction of equal tokens over the batch."""
    return torch.stack([(a == b).float().mean() for a, b in zip(tokens, ref, strict=True)])


def bit_agreement(tokens: list[Tensor], ref: list[Tensor], bits: int) -> Tensor:
    """Per scale (S,) fraction of equal bits of d-bit integer tokens over the batch."""
    shifts = torch.arange(bits, device=tokens[0].device)
    return torch.stack([(((a ^ b)[..., None] >> shifts) & 1).float().mean().neg().add(1)
                        for a, b in zip(tokens, ref, strict=True)])


def to_numpy(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) float64."""
    return images.detach().permute(0, 2, 3, 1).double().cpu().numpy()


def psnr(images: Tensor, ref: Tensor) -> list[float]:
    from skimage.metrics import peak_signal_noise_ratio

    out = []
    for a, b in zip(to_numpy(images), to_numpy(ref), strict=True):
        out.append(PSNR_IDENTICAL if np.array_equal(a, b) else float(peak_signal_noise_ratio(b, a, data_range=1.0)))
    return out


def ssim(images: Tensor, ref: Tensor) -> list[float]:
    from skimage.metrics import structural_similarity

    return [float(structural_similarity(b, a, channel_axis=-1, data_range=1.0))
            for a, b in zip(to_numpy(images), to_numpy(ref), strict=True)]


def fidelity_metrics(names: list[str], generated_dir: Path | None, reference: str | None,
                     check_only: bool = False) -> dict[str, Any]:
    """FID / IS / precision-recall of the PNGs in ``generated_dir`` with torch-fidelity (``reference``: a folder of
    real images or a statistics file torch-fidelity reads). One clear message when anything is missing;
    ``check_only`` stops after checking the package and the reference."""
    try:
        import torch_fidelity
    except ImportError as err:
        raise UsageError(f"task metrics {names} need torch-fidelity (pip install torch-fidelity, with a torchvision "
                         "matching the installed torch) and its Inception weights; not installed here. Drop them "
                         "from task.metrics to run the offline metrics only.") from err
    if reference is None or not Path(reference).exists():
        raise UsageError(f"task metrics {names} need real-image references: set task.fid_reference to a folder of "
                         f"ImageNet 256x256 validation images or a statistics file (got {reference!r})")
    if check_only:
        return {}
    try:
        res = torch_fidelity.calculate_metrics(input1=str(generated_dir), input2=str(reference), cuda=torch.cuda.
                                               is_available(), fid="fid" in names, isc="inception_score" in names,
                                               prc="precision_recall" in names, verbose=False)
    except Exception as err:  # noqa: BLE001 - weights download / cache failures of torch-fidelity
        raise UsageError(f"torch-fidelity could not compute {names} (its Inception weights must be in its cache "
                         f"when offline): {err}") from err
    return {k: float(v) for k, v in res.items()}


def load_clip(path: str) -> tuple[Any, Any]:
    """transformers' CLIPModel + CLIPProcessor from ``path`` (a folder or a hub id in the cache), eval mode."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        return CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    except OSError as err:
        raise UsageError(f"task metric clip_score needs a CLIP model: task.clip_model={path!r} could not be loaded "
                         f"(download openai/clip-vit-large-patch14 into the hub cache or give a local folder): "
                         f"{err}") from err


@torch.no_grad()
def clip_score(images: Tensor, prompts: list[str], clip: tuple[Any, Any]) -> list[float]:
    """Per image (B, 3, H, W) in [0, 1] and its prompt: ``100 * max(cos(E_image, E_text), 0)``."""
    model, processor = clip
    pixels = list(images.clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    inputs = processor(text=list(prompts), images=pixels, return_tensors="pt", padding=True, truncation=True)
    out = model(**{k: v.to(model.device) for k, v in inputs.items()})
    cos = (out.image_embeds * out.text_embeds).sum(-1)  # both L2-normalised by CLIPModel
    return (100 * cos.clamp_min(0)).tolist()

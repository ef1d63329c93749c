"""Image-generation metrics of the VAR runner.

Offline, always (agreement with the full-cache generation of the same seed):
* ``token_agreement``: per scale, the fraction of the scale's tokens equal to the reference's.
* ``psnr``: 10 log10(1 / MSE) of [0, 1] images (scikit-image's ``peak_signal_noise_ratio``, data_range 1); identical
  images are reported as ``PSNR_IDENTICAL`` dB (the MSE is 0) and counted in ``identical_images``.
* ``ssim``: scikit-image's ``structural_similarity`` (Wang et al. 2004; 7 x 7 uniform window, K1 0.01, K2 0.03,
  data_range 1, mean over the RGB channels).

Distribution metrics against real images (FID, IS, precision/recall; CLIP-style scores for text conditions) need
torch-fidelity / open_clip and their network weights: ``fidelity_metrics`` computes them when those load and
otherwise raises one ``UsageError`` naming what is missing.
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


def token_agreement(tokens: list[Tensor], ref: list[Tensor]) -> Tensor:
    """Per scale (S,) fraction of equal tokens over the batch."""
    return torch.stack([(a == b).float().mean() for a, b in zip(tokens, ref, strict=True)])


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

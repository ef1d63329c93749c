"""Infinity's scale schedules (FoundationVision/Infinity ``infinity/utils/dynamic_resolution.py``, MIT).

Infinity generates at several resolutions and aspect ratios ("h_div_w templates"); each template lists the
(h, w) token grid of every scale, and a resolution name ("pn": 0.06M / 0.25M / 0.60M / 1M pixels) takes the
first 7 / 10 / 12 / 13 scales of it (256 / 512 / 768 / 1024 pixels a side with the VAE's stride 16). We implement
the square template ``1:1`` (h_div_w 1.0), the one the released demos and GenEval use; the other ratios are refused
with one message (our KV cache indexes a scale by its side, ``kvbench.var.cache``). A model may also stop early
(``n_scales``, Infinity's ``trunk_scale``): the last scale kept is then the final latent (a deviation used by the
tiny model, whose latent is 8 x 8).
"""

from __future__ import annotations

from kvbench.errors import UsageError

SIDES_1_1 = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)  # the 1:1 template's (h = w) per scale
PN_SCALES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}  # scales per resolution name
PN_PIXELS = {"0.06M": 256, "0.25M": 512, "0.60M": 768, "1M": 1024}
TEMPLATES = {"1:1": SIDES_1_1}
VAE_STRIDE = 16


def scale_sides(h_div_w: str = "1:1", pn: str = "1M", n_scales: int | None = None) -> tuple[int, ...]:
    """Token-grid side of every scale, e.g. ``scale_sides("1:1", "0.06M")`` = (1, 2, 4, 6, 8, 12, 16)."""
    if h_div_w not in TEMPLATES:
        raise UsageError(f"Infinity h_div_w template {h_div_w!r} is not implemented; implemented: {list(TEMPLATES)} "
                         "(the square schedules)")
    if pn not in PN_SCALES:
        raise UsageError(f"Infinity resolution pn={pn!r} unknown; one of {list(PN_SCALES)}")
    sides = TEMPLATES[h_div_w][: PN_SCALES[pn]]
    if n_scales is not None:
        if not 1 <= n_scales <= len(sides):
            raise UsageError(f"n_scales={n_scales} must be in [1, {len(sides)}] for {h_div_w} {pn}")
        sides = sides[:n_scales]
    return sides


def rope_extent(h_div_w: str = "1:1") -> int:
    """Side of the grid RoPE positions are spread over (the template's 1M final scale: 64 for 1:1)."""
    return TEMPLATES[h_div_w][PN_SCALES["1M"] - 1]

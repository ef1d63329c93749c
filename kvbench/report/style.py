"""One fixed method -> (order, colour, marker) mapping used by every table and figure.

Known methods come first in :data:`METHOD_ORDER` (reference, then roughly oldest to newest) with fixed colours;
any other method name (a new method or a variant such as ``adakv_qhead``) follows in alphabetical order with a
colour picked deterministically from its name, so it is the same in every figure and every report.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

#: Display order of known methods (rows of tables, legend entries).
METHOD_ORDER: tuple[str, ...] = (
    "fullkv", "streamingllm", "h2o", "snapkv", "pyramidkv", "adakv", "defensivekv",
)  # fmt: skip

#: Fixed colours (matplotlib tab10 family; the full cache in black).
METHOD_COLORS: dict[str, str] = {
    "fullkv": "#000000",
    "streamingllm": "#7f7f7f",
    "h2o": "#8c564b",
    "snapkv": "#1f77b4",
    "pyramidkv": "#2ca02c",
    "adakv": "#ff7f0e",
    "defensivekv": "#d62728",
}
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
#: Colours for names not in METHOD_COLORS (tab20 minus the hues above), chosen by a stable hash of the name.
FALLBACK_COLORS = ("#9467bd", "#e377c2", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
                   "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#393b79", "#637939", "#843c39")


def base_method(label: str) -> str:
    """The method name of a row label (``"snapkv (pyramid)"`` -> ``"snapkv"``)."""
    return label.split(" (", 1)[0]


def method_color(label: str) -> str:
    """The colour of a method (or ``"method (allocator)"`` label); stable across figures and sessions."""
    if label in METHOD_COLORS:
        return METHOD_COLORS[label]
    return FALLBACK_COLORS[zlib.crc32(label.encode()) % len(FALLBACK_COLORS)]


def method_marker(label: str) -> str:
    name = base_method(label)
    if name in METHOD_ORDER:
        return MARKERS[METHOD_ORDER.index(name) % len(MARKERS)]
    return MARKERS[zlib.crc32(label.encode()) % len(MARKERS)]


def sort_key(label: str) -> tuple[int, str]:
    name = base_method(label)
    return (METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER), label)


def method_order(labels: Iterable[str]) -> list[str]:
    """Distinct labels in display order: known methods first (fixed order), then the others alphabetically."""
    return sorted(set(labels), key=sort_key)

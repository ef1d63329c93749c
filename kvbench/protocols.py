"""The protocol registry: how one sample's questions are prompted, compressed and answered.

Each protocol is a generator ``protocol(engine, tok, sample, todo, opts) -> Iterator[record]`` that yields every
question's record as soon as it is scored (the runner appends and flushes it at once), built on the shared
helpers of :mod:`kvbench.pipeline` (prompt encoding, prefill + compression, answers, records). This module
imports neither: the registry names the implementations by dotted path, so the config checks
(:mod:`kvbench.validate`) read the protocol names without importing torch, and a new protocol (multimodal,
image generation) is one entry here plus its module.

* ``query_aware`` (``protocol=`` value): context + question prefilled and compressed together, per question.
* ``query_agnostic`` (``protocol=`` value): the context compressed once; each question appended over it,
  answered and rolled back.
* ``episodic``: chosen by the method (``Method.episodic``, EpiCache) under ``protocol=query_agnostic``: several
  compressed caches per context, each question routed to one (:mod:`kvbench.episodic`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProtocolSpec:
    """One registered protocol: its name, its implementation (``module:function``), and whether users select it
    with ``protocol=<name>`` (else a method's declared capability selects it under ``requires``)."""

    name: str
    target: str
    selectable: bool = True
    requires: str | None = None  # the selectable protocol it runs under (episodic: query_agnostic)


REGISTRY: dict[str, ProtocolSpec] = {spec.name: spec for spec in (
    ProtocolSpec("query_aware", "kvbench.pipeline:query_aware"),
    ProtocolSpec("query_agnostic", "kvbench.pipeline:query_agnostic"),
    ProtocolSpec("episodic", "kvbench.episodic:episodic", selectable=False, requires="query_agnostic"),
)}
SELECTABLE = tuple(name for name, spec in REGISTRY.items() if spec.selectable)


def protocol_name(protocol: str, episodic: bool) -> str:
    """The registered protocol that runs ``protocol=<protocol>`` for a method (``episodic``: ``Method.episodic``)."""
    return "episodic" if episodic else protocol


def get(name: str) -> Callable[..., Any]:
    """The implementation of a registered protocol."""
    module, _, attr = REGISTRY[name].target.partition(":")
    return getattr(importlib.import_module(module), attr)

"""The identity of a run's inputs beyond its config: the data it was computed from and the model files.

* Data: a digest per sample (``sample_digest``: its context, questions, answers and metadata, as loaded), in task
  order. Whatever the loader read (a ``data_dir``, the prepared release, a generator's output), the run directory
  records what the questions *were*, so other data under the same config is recognised.
* Model: a local directory (or ``embedded:``) by a digest of its files; a hub id by the revision asked for and
  the commit the Hugging Face cache resolves it to (known once the files are cached).

Deviation: files over :data:`FULL_HASH_BYTES` (weights) are digested by their size and their first and last MiB,
not in full: hashing tens of GB on every start would cost minutes; a re-trained checkpoint changes them anyway.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

FULL_HASH_BYTES = 32 * 2**20
EDGE_BYTES = 2**20
COMMIT = re.compile(r"[0-9a-f]{40}")


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (a method's input files, release files, calibrations)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def digest(obj: Any) -> str:
    """sha256 (16 hex chars) of an object's canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_canonical, ensure_ascii=False).encode()
                          ).hexdigest()[:16]


def _canonical(obj: Any) -> Any:
    """A JSON stand-in for a non-JSON value: an in-memory image by its pixels (its ``repr`` holds a memory address,
    different in every process), anything else by ``str``."""
    from PIL import Image

    if isinstance(obj, Image.Image):
        return {"image_sha256": hashlib.sha256(obj.tobytes()).hexdigest(), "size": obj.size, "mode": obj.mode}
    return str(obj)


def sample_digest(sample: Any) -> str:
    """The digest of one loaded sample (a :class:`kvbench.tasks.base.Sample`)."""
    return digest(dataclasses.asdict(sample))


def data_identity(samples: list[Any]) -> dict[str, str]:
    """``{sample_id: digest}`` in task order."""
    return {s.id: sample_digest(s) for s in samples}


def data_difference(old: dict[str, str] | None, new: dict[str, str]) -> str | None:
    """Why ``new`` data is not the data ``old`` recorded (their common prefix must agree), or None."""
    if not old:
        return None
    old_items, new_items = list(old.items()), list(new.items())
    n = min(len(old_items), len(new_items))
    differ = [f"{o[0]}" if o[0] == w[0] else f"{o[0]} then, {w[0]} now"
              for o, w in zip(old_items[:n], new_items[:n], strict=True) if o != w]
    if not differ:
        return None
    shown = "; ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
    return f"the task's data differ in {len(differ)} of the first {n} samples ({shown})"


def file_digest(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}:".encode())
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            h.update(f.read())
        else:
            h.update(f.read(EDGE_BYTES))
            f.seek(size - EDGE_BYTES)
            h.update(f.read(EDGE_BYTES))
    return h.hexdigest()


DOC_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".pdf")  # model cards: not part of the model


def files_digest(root: Path) -> str:
    """Digest of a model directory's files (names, sizes, contents; hidden files and model cards skipped)."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if not any(part.startswith(".") for part in rel.parts) and path.suffix.lower() not in DOC_SUFFIXES:
            h.update(f"{rel.as_posix()}={file_digest(path)}\n".encode())
    return h.hexdigest()[:16]


def cached_commit(repo_id: str, revision: str) -> str | None:
    """The commit the local Hugging Face cache resolves ``repo_id@revision`` to, or None if it is not cached."""
    if COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - an invalid id is reported by the model loader
        return None
    return Path(hit).parent.name if isinstance(hit, str) else None


def model_identity(source: str, revision: str | None) -> dict[str, Any]:
    """``{"local": digest}`` for a directory, ``{"hub": id, "revision": r, "commit": c | None}`` for a hub id
    (``source`` as :func:`kvbench.models.resolve_source` returns it)."""
    path = Path(source)
    if path.is_dir():
        return {"local": files_digest(path)}
    rev = revision or "main"
    return {"hub": source, "revision": rev, "commit": cached_commit(source, rev)}


def model_difference(old: dict[str, Any] | None, new: dict[str, Any]) -> str | None:
    """Why the model files now are not those ``old`` recorded, or None (an unknown commit is no difference)."""
    if not old or old == new:
        return None
    if "local" in old and "local" in new:
        return f"the model directory's files differ (digest {old['local']} then, {new['local']} now)"
    if "hub" in old and "hub" in new:
        if old.get("commit") and new.get("commit") and old["commit"] != new["commit"]:
            return f"the model's hub commit differs ({old['commit']} then, {new['commit']} now)"
        return None
    return f"the model source differs ({old} then, {new} now)"

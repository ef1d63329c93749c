"""Checksums of pinned release files, checked where they are downloaded, and each benchmark's ``source.json``.

A benchmark's ``prepare()`` downloads files at pinned commits. Where the published file's SHA-256 is known, the
download is checked against it: a file that differs (upstream rewrote history, a proxy served something else, a
truncated transfer) is kept beside the target as ``<name>.rejected`` and the run stops with one message naming
both digests. Where the digest is not known in advance it is computed and recorded. Either way
``<root>/<benchmark>/source.json`` lists, per file, where it came from, the resolved commit when the source is a
hub repository, its SHA-256 and whether that matched a pinned value, so a result can be traced to its bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbench.errors import UsageError
from kvbench.identity import sha256_file

SOURCE_FILE = "source.json"


@dataclass(frozen=True)
class Checksum:
    """The SHA-256 (64 hex digits) and size in bytes a published file must have; ``size`` None: not checked."""

    sha256: str
    size: int | None = None

    def __post_init__(self) -> None:
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"not a lower-case hex SHA-256: {self.sha256!r}")


def check(path: str | os.PathLike, expected: Checksum | None, what: str) -> str:
    """The SHA-256 of ``path``; with ``expected``, a mismatch moves the file to ``<name>.rejected`` (nothing is
    deleted) and raises :class:`UsageError` naming ``what``, both digests and where the file went."""
    path = Path(path)
    size = path.stat().st_size
    digest = sha256_file(path)
    if expected is None or (digest == expected.sha256 and expected.size in (None, size)):
        return digest
    rejected = path.with_name(path.name + ".rejected")
    os.replace(path, rejected)
    want = f"sha256 {expected.sha256}" + (f", {expected.size} bytes" if expected.size is not None else "")
    raise UsageError(f"{what}: the downloaded file has sha256 {digest}, {size} bytes, but the pinned release has "
                     f"{want}. It is kept as {rejected}; the source changed or the download was corrupted: "
                     f"download it again, or pin a new revision and checksum after checking the new data.")


def matches(path: str | os.PathLike, expected: Checksum | None) -> bool:
    """Whether an already-present ``path`` is the pinned file (always False without a checksum: re-fetch)."""
    path = Path(path)
    return (expected is not None and path.is_file() and expected.size in (None, path.stat().st_size)
            and sha256_file(path) == expected.sha256)


def record(dest: str | os.PathLike, entries: Mapping[str, Mapping[str, Any]]) -> Path:
    """Merge ``{relative path: provenance}`` into ``dest/source.json`` (several ``prepare`` calls accumulate)."""
    out = Path(dest) / SOURCE_FILE
    current = json.loads(out.read_text()) if out.exists() else {}
    files = current.get("files", {})
    files.update({k: dict(v) for k, v in entries.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"files": dict(sorted(files.items()))}, indent=2) + "\n")
    return out


def provenance(path: Path, dest: Path, source: str, digest: str, expected: Checksum | None,
               **extra: Any) -> dict[str, dict[str, Any]]:
    """One ``source.json`` entry: ``{path relative to dest: {source, sha256, bytes, pinned, ...extra}}``."""
    entry = {"source": source, "sha256": digest, "bytes": path.stat().st_size, "pinned": expected is not None, **extra}
    return {path.relative_to(dest).as_posix(): entry}

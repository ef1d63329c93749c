"""Downloading authors' release files (GitHub raw files at pinned commits, RULER's URLs) for ``prepare()``."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from kvbench.errors import UsageError
from kvbench.tasks import pinned
from kvbench.tasks.pinned import Checksum


def download(url: str, path: Path, timeout: float = 60.0, expected: Checksum | None = None,
             root: Path | None = None) -> Path:
    """``url`` into ``path`` (written to a temporary name, then renamed); one clear error when it fails.

    With ``expected`` the file is checked against the pinned checksum (see :mod:`kvbench.tasks.pinned`), and a
    file already there that matches it is not downloaded again. With ``root`` (the benchmark's data directory)
    the file's provenance is recorded in ``root/source.json``."""
    if not pinned.matches(path, expected):
        _fetch(url, path, timeout)
    digest = pinned.check(path, expected, url)
    if root is not None:
        pinned.record(root, pinned.provenance(path, Path(root), url, digest, expected))
    return path


def _fetch(url: str, path: Path, timeout: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:  # noqa: S310
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"could not download {url} to {path}: {err}. Run this on a machine with network, or "
                         f"copy the file there by hand.") from err
    os.replace(tmp, path)

"""Downloading authors' release files (GitHub raw files at pinned commits, RULER's URLs) for ``prepare()``."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from kvbench.errors import UsageError


def download(url: str, path: Path, timeout: float = 60.0) -> Path:
    """``url`` into ``path`` (written to a temporary name, then renamed); one clear error when it fails."""
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
    return path

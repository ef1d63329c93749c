"""Reading and writing the files of a run directory: one clear error per unreadable file, nothing lost on a full disk.

Readers only read: a partial trailing line of ``predictions.jsonl`` (a writer killed mid-line, or one appending
right now) is skipped, never cut off; only the writer holding the directory's lock repairs it on resume
(:func:`repair_tail`). A line or file that cannot be parsed raises :class:`CorruptRunError` naming the file, the
line and the fix. Predictions are keyed by question id: a later complete line of the same id replaces the earlier
one, and the number of such duplicates is reported.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvbench.errors import UsageError
from kvbench.schema import REQUIRED_RECORD_KEYS

FIX = ("delete that line (its questions are redone on resume) or the file, or rerun with overwrite=true to start "
       "this run again")
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CorruptRunError(UsageError):
    """A run file that cannot be parsed; the message names the file, the line and what to do."""


class DiskFullError(UsageError):
    """A write failed for lack of space (or a file-size limit); what was written before is intact."""


def disk_error(path: Path, err: OSError) -> OSError:
    """A :class:`DiskFullError` for a full disk, else the error itself."""
    if err.errno in FULL_ERRNOS:
        return DiskFullError(f"no space left on the device writing {path} ({os.strerror(err.errno)}); free some "
                             "space (or point paths.results elsewhere) and rerun: the answers already written are "
                             "kept and the run resumes from them")
    return err


def atomic_write(path: Path, text: str) -> None:
    """Write ``path`` through ``<path>.tmp`` + rename; the temporary file never outlives a failure."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise disk_error(path, err) from err
        raise


def append_line(path: Path, line: str) -> None:
    """Append one line and flush it to disk (writer only). A partial last line left by a killed writer is cut
    first; a failed write is cut back, so that no partial line stays in the middle of the file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        start = os.fstat(fd).st_size
        if start and os.pread(fd, 1, start - 1) != b"\n":
            start = start - repair_tail(path)
        try:
            data = memoryview(line.encode())
            while data:  # a full disk may first take part of the line (a short write), then fail
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError as err:
            with contextlib.suppress(OSError):  # else the reader skips the partial line and the writer cuts it
                os.ftruncate(fd, start)
            raise disk_error(path, err) from err
    finally:
        os.close(fd)


def read_yaml(path: Path, fix: str = FIX) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise CorruptRunError(f"{path}:{where} cannot be parsed as YAML ({problem}); {fix}") from None
    except UnicodeDecodeError as err:
        raise CorruptRunError(f"{path}: not UTF-8 text ({err.reason}); {fix}") from None


def read_json(path: Path, fix: str = FIX) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CorruptRunError(f"{path}: line {err.lineno} cannot be parsed as JSON ({err.msg}); {fix}") from None
    except UnicodeDecodeError as err:
        raise CorruptRunError(f"{path}: not UTF-8 text ({err.reason}); {fix}") from None


@dataclass
class Predictions:
    """The complete lines of a ``predictions.jsonl``, keyed by id (the last complete line of an id wins)."""

    by_id: dict[str, dict[str, Any]] = field(default_factory=dict)
    n_duplicates: int = 0
    partial_tail: int = 0  # bytes of a trailing line without its newline (skipped)

    @property
    def records(self) -> list[dict[str, Any]]:
        return list(self.by_id.values())


def parse_line(path: Path, number: int, line: bytes) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptRunError(f"{path}: line {number} cannot be parsed as JSON ({err}); {FIX}") from None
    missing = [k for k in REQUIRED_RECORD_KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise CorruptRunError(f"{path}: line {number} is not a prediction record (no {', '.join(missing)}); {FIX}")
    return record


def read_predictions(path: Path) -> Predictions:
    """Parse ``predictions.jsonl`` without changing it."""
    out = Predictions()
    if not path.exists():
        return out
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    out.partial_tail = len(raw) - end
    for number, line in enumerate(raw[:end].split(b"\n"), start=1):
        if line.strip():
            record = parse_line(path, number, line)
            out.n_duplicates += record["id"] in out.by_id
            out.by_id[record["id"]] = record
    return out


def repair_tail(path: Path) -> int:
    """Cut a partial trailing line (writer only, under the run's lock); returns the bytes removed."""
    if not path.exists():
        return 0
    raw = path.read_bytes()
    keep = raw.rfind(b"\n") + 1
    if keep < len(raw):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return len(raw) - keep

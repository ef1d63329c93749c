"""Benchmark data on disk and on the hub, offline-aware: one clear message instead of a 20-second retry loop.

Data root: every benchmark keeps its files under ``<root>/<benchmark>/`` where ``root`` is ``paths.data`` in the
config (default ``$KVBENCH_DATA``, else ``./data``). ``scripts/prepare_data.py <benchmark>`` fills it on a machine
with network; compute nodes then read the files with ``datasets`` and never touch the network.

A benchmark module ``kvbench/tasks/<bench>.py`` plugs into ``prepare_data.py`` by defining, at module level,
``BENCHMARK = "<bench>"`` and ``prepare(dest: Path, names: list[str] | None = None) -> list[Path]`` (download into
``dest = <root>/<bench>``, return the files written). Nothing else is edited.

Two ways to get data, both pinned:
  * :func:`fetch_hub_files`: release files of a hub repository at a pinned commit (e.g. LongBench's ``data.zip``),
    downloaded into the data root; loaders then read them with :func:`load_local`.
  * :func:`load_hub_dataset`: a hub dataset in a format ``datasets`` reads natively (parquet/json), at a pinned
    revision, through the ``datasets`` cache (``HF_HOME`` / ``HF_DATASETS_CACHE``), or from a local copy.
Offline (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set, or huggingface.co not answering a 3 s probe) either
raises :class:`DataMissingError` naming the dataset, the missing path and the prepare command.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from kvbench.errors import UsageError
from kvbench.tasks import pinned
from kvbench.tasks.pinned import Checksum

DATA_ENV = "KVBENCH_DATA"
_TRUE = ("1", "true", "yes", "on")


class DataMissingError(UsageError):
    """Benchmark data that is neither on disk nor downloadable here, with the command that fetches it."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$KVBENCH_DATA``, else ``./data``."""
    return Path(root or os.environ.get(DATA_ENV) or "data").expanduser()


def offline_env() -> bool:
    """Whether the user declared the hub offline (``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub can be used: not declared offline and huggingface.co answering on 443 within ``timeout``
    (probed once per process)."""
    return not offline_env() and _probe(timeout)


@functools.cache
def _probe(timeout: float) -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def prepare_command(benchmark: str, names: Sequence[str] = ()) -> str:
    only = f" --only {','.join(names)}" if names else ""
    return f"python scripts/prepare_data.py {benchmark}{only}"


def missing_message(benchmark: str, dataset: str, path: str | os.PathLike, names: Sequence[str] = ()) -> str:
    return (f"{dataset} is not available offline: {path} does not exist and the Hugging Face hub cannot be reached "
            f"(offline). On a machine with network run `{prepare_command(benchmark, names)}` with {DATA_ENV} (or "
            f"paths.data=...) pointing at shared storage, or point the task's data_dir at a local copy.")


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Put ``huggingface_hub`` and ``datasets`` in offline mode for the block (cache only, no retries)."""
    import datasets.config as dconfig
    import huggingface_hub.constants as hconst

    saved = hconst.HF_HUB_OFFLINE, dconfig.HF_HUB_OFFLINE
    hconst.HF_HUB_OFFLINE = dconfig.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hconst.HF_HUB_OFFLINE, dconfig.HF_HUB_OFFLINE = saved


def load_local(files: str | os.PathLike | Sequence[str | os.PathLike], fmt: str | None = None) -> Any:
    """A ``datasets.Dataset`` from local JSON/JSONL/parquet/CSV files (``fmt`` from the suffix unless given).

    Reads through ``datasets``' packaged builders in offline mode, so nothing is looked up on the hub."""
    import datasets

    paths = [str(f) for f in ([files] if isinstance(files, (str, os.PathLike)) else files)]
    suffix = Path(paths[0]).suffix.lstrip(".")
    builder = fmt or {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(suffix)
    if builder is None:
        raise UsageError(f"cannot tell the format of {paths[0]} (expected .jsonl/.json/.parquet/.csv)")
    datasets.disable_progress_bars()
    with hub_offline():
        return datasets.load_dataset(builder, data_files={"test": paths}, split="test")


def fetch_hub_files(repo_id: str, revision: str, filenames: Sequence[str], dest: str | os.PathLike,
                    benchmark: str, repo_type: str = "dataset",
                    expected: Mapping[str, Checksum] | None = None) -> list[Path]:
    """Download ``filenames`` of ``repo_id`` at ``revision`` into ``dest`` (kept with their repo paths).

    Each file is checked against ``expected[filename]`` when given (a mismatch is kept as ``.rejected`` and
    stops the run, see :mod:`kvbench.tasks.pinned`) and recorded in ``dest/source.json`` with the commit the
    revision resolved to."""
    from huggingface_hub import hf_hub_download

    dest = Path(dest)
    if not hub_reachable():
        raise DataMissingError(missing_message(benchmark, f"{repo_id}@{revision}", dest / filenames[0]))
    commit = resolved_commit(repo_id, revision, repo_type)
    out = []
    for name in filenames:
        want = (expected or {}).get(name)
        path = Path(hf_hub_download(repo_id, name, repo_type=repo_type, revision=revision, local_dir=dest))
        digest = pinned.check(path, want, f"{repo_id}@{revision}/{name}")
        pinned.record(dest, pinned.provenance(path, dest, f"hf://{repo_type}s/{repo_id}/{name}", digest, want,
                                              revision=revision, commit=commit))
        out.append(path)
    return out


def resolved_commit(repo_id: str, revision: str, repo_type: str = "dataset") -> str | None:
    """The commit sha ``revision`` (a branch, tag or sha) of a hub repository points at; None if not answered."""
    from huggingface_hub import HfApi

    try:
        return HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision).sha
    except Exception:  # noqa: BLE001 - informative only: the checksums identify the data
        return None


def require(path: str | os.PathLike, benchmark: str, dataset: str, names: Sequence[str] = ()) -> Path:
    """``path`` if it exists, else :class:`DataMissingError` with the prepare command."""
    path = Path(path)
    if not path.exists():
        raise DataMissingError(missing_message(benchmark, dataset, path, names))
    return path


def load_hub_dataset(repo_id: str, revision: str, benchmark: str, name: str | None = None, split: str = "test",
                     data_dir: str | os.PathLike | None = None, **kwargs: Any) -> Any:
    """A hub dataset (parquet/json repo; no loading scripts) at a pinned ``revision``, or a local copy.

    ``data_dir`` (a local directory or file of the dataset) wins over the hub. Without network the ``datasets``
    cache is used in offline mode; a dataset that is not cached raises :class:`DataMissingError` at once."""
    import datasets

    datasets.disable_progress_bars()
    if data_dir is not None:
        local = require(data_dir, benchmark, f"{repo_id} (local copy)")
        if local.is_file():
            return load_local(local)
        with hub_offline():
            return datasets.load_dataset(str(local), name, split=split, **kwargs)
    online = hub_reachable()
    try:
        with hub_offline() if not online else contextlib.nullcontext():
            return datasets.load_dataset(repo_id, name, split=split, revision=revision, **kwargs)
    except (ConnectionError, FileNotFoundError, OSError) as err:
        if online:
            raise
        cache = os.environ.get("HF_DATASETS_CACHE") or datasets.config.HF_DATASETS_CACHE
        label = f"{repo_id}" + (f"/{name}" if name else "") + f"@{revision}"
        raise DataMissingError(missing_message(benchmark, label, Path(cache))) from err

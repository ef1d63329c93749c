"""Loading a model and its tokenizer from the hub, a local directory, or the embedded assets, offline-aware."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from kvbench import gguf
from kvbench.engine.attention import check_backend
from kvbench.errors import UsageError

ASSETS = Path(__file__).resolve().parent / "assets"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(UsageError):
    """A model that cannot be loaded, with the reason and what to do."""


def resolve_source(pretrained: str) -> str:
    """``embedded:<name>`` -> the shipped directory; a path must exist; anything else is a hub id."""
    if pretrained.startswith("embedded:"):
        path = ASSETS / pretrained.split(":", 1)[1]
        if not (path / "config.json").exists():
            raise ModelLoadError(f"embedded model {pretrained!r} not found at {path}; available: {embedded_models()}")
        return str(path)
    if Path(pretrained).expanduser().exists():
        return str(Path(pretrained).expanduser())
    if pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1:  # hub ids are "org/name"
        raise ModelLoadError(f"model path {pretrained!r} does not exist")
    return pretrained


def embedded_models() -> list[str]:
    return sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").exists()) if ASSETS.exists() else []


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether huggingface.co answers on 443 (a quick probe, so offline nodes fail fast instead of retrying)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={device!r} but no CUDA device is available; use device=cpu or device=auto")
    return torch.device(device)


def _source(spec: Any) -> tuple[str, dict[str, Any]]:
    """The resolved source and the ``from_pretrained`` keyword arguments (offline-aware). ``gguf:<name>`` is a
    checkpoint shipped as GGUF inside a Python package (``spec.gguf``), converted once (``kvbench.gguf``)."""
    if str(spec.pretrained).startswith(gguf.PREFIX):
        if spec.get("gguf") is None:
            raise ModelLoadError(f"model.pretrained={spec.pretrained!r} needs a model.gguf entry (files, sha256, "
                                 "install); see conf/model/smollm2-135m-instruct.yaml")
        source = str(gguf.converted_dir(str(spec.pretrained)[len(gguf.PREFIX) :], spec.gguf))
    else:
        source = resolve_source(str(spec.pretrained))
    local = Path(source).exists()
    kwargs: dict[str, Any] = {"revision": None if local else spec.get("revision"),
                              "trust_remote_code": bool(spec.get("trust_remote_code", False))}
    if not local and not hub_reachable():
        kwargs["local_files_only"] = True
    return source, kwargs


def _check_local(source: str) -> None:
    """A local model directory must hold a config.json (an empty or unrelated directory is named as such)."""
    path = Path(source)
    if path.is_dir() and not (path / "config.json").is_file():
        what = "is empty" if not any(path.iterdir()) else "has no config.json"
        raise ModelLoadError(f"model directory {source} {what}: it is not a Hugging Face model directory. Download "
                             "the model into it (`hf download <org/name> --local-dir ...`) or point "
                             "model.pretrained at the directory that holds config.json")


def _translated(err: Exception, source: str) -> bool:
    """Errors turned into one ModelLoadError: OSError (missing files, hub), anything a local directory's files
    raise (corrupt JSON, truncated weights); UsageErrors and other errors of hub models pass unchanged."""
    return not isinstance(err, UsageError) and (isinstance(err, OSError) or Path(source).is_dir())


def _load_error(spec: Any, source: str, kwargs: dict[str, Any], err: Exception) -> ModelLoadError:
    if Path(source).is_dir():  # corrupt or truncated files: transformers/safetensors name the file, not the fix
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return ModelLoadError(f"could not load the model files in {source} ({type(err).__name__}: {first[:300]}); "
                              "they look corrupt or incomplete: download them again")
    if kwargs.get("local_files_only"):
        rev = spec.get("revision") or "main"
        return ModelLoadError(
            f"model {source!r} (revision {rev}) is not in the local Hugging Face cache and the hub cannot be "
            f"reached. Download it on a machine with network (`hf download {source} --revision {rev}`, with "
            "HF_HOME pointing at shared storage), or set model.pretrained=/path/to/local/copy."
        )
    return ModelLoadError(f"could not load model {source!r}: {err}")


def load_tokenizer(spec: Any) -> PreTrainedTokenizerBase:
    """The tokenizer of a ``conf/model/*.yaml`` node (tasks that are built in the model's own tokens need it)."""
    source, kwargs = _source(spec)
    _check_local(source)
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as err:
        if not _translated(err, source):
            raise
        raise _load_error(spec, source, kwargs, err) from err


#: transformers' video processors are built on torchvision; where it imports (GPU nodes) they are used.
TORCHVISION = importlib.util.find_spec("torchvision") is not None


def load_vision_processors(spec: Any, with_processor: bool, with_video: bool = False
                           ) -> tuple[Any, Any, Any, str]:
    """A vision-language model's image processor (the PIL variant without torchvision), with ``with_processor``
    its transformers processor (LLaVA-style models; Qwen-VL placeholders kvbench expands itself), with
    ``with_video`` its video processor (``AutoVideoProcessor``, needs torchvision; else None), and the resolved
    source."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoVideoProcessor

    source, kwargs = _source(spec)
    try:
        image_processor = AutoImageProcessor.from_pretrained(source, **kwargs)
        processor = AutoProcessor.from_pretrained(source, **kwargs) if with_processor else None
        video = AutoVideoProcessor.from_pretrained(source, **kwargs) if with_video else None
    except Exception as err:
        if not _translated(err, source):
            raise
        raise _load_error(spec, source, kwargs, err) from err
    return image_processor, processor, video, source


def load_model(spec: Any, device: torch.device, tokenizer: PreTrainedTokenizerBase | None = None
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a ``conf/model/*.yaml`` node (pretrained, revision, dtype, ...)."""
    check_backend(spec.attn_implementation)
    if spec.dtype not in DTYPES:
        raise UsageError(f"model.dtype={spec.dtype!r}; choose one of {', '.join(DTYPES)}")
    source, kwargs = _source(spec)
    _check_local(source)
    hf_logging.disable_progress_bar()  # kvbench shows its own progress; the weight-loading bar is noise
    try:
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(source, **kwargs)
        # the engine replaces the attention function; "sdpa" only decides what transformers builds at load time
        auto = AutoModelForImageTextToText if spec.get("family", "text") == "vl" else AutoModelForCausalLM
        model = auto.from_pretrained(source, dtype=DTYPES[spec.dtype], attn_implementation="sdpa", **kwargs)
    except Exception as err:
        if not _translated(err, source):
            raise
        raise _load_error(spec, source, kwargs, err) from err
    return model.to(device).eval(), tokenizer

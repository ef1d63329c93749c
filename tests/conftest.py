"""Shared fixtures: tiny random GQA models of every supported architecture, and methods built from the Hydra configs.

Models: hidden 64, 2 layers, 4 query heads, 2 KV heads (G = 2), head_dim 16, vocab 128, seeded and in eval mode.
Weights are initialised with a larger std than the transformers default (0.02) so that attention is peaked and
evicting tokens visibly changes the logits (otherwise every compression test would pass on near-uniform attention).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
_MODEL_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}

VOCAB = 128
HIDDEN = 64
N_LAYERS = 2
N_HEADS = 4
N_KV_HEADS = 2
HEAD_DIM = 16


def method_names() -> list[str]:
    """Every method with a config file (a new ``conf/method/<name>.yaml`` is tested automatically)."""
    names = sorted(p.stem for p in CONF_DIR.glob("method/*.yaml"))
    assert names, f"no method configs found under {CONF_DIR / 'method'}"
    return names


METHODS = tuple(method_names())



def build_model(arch: str, seed: int = 0, attn_implementation: str = "eager") -> torch.nn.Module:
    """A tiny random decoder of the given architecture (fp32, CPU, eval mode)."""
    config_cls, model_cls = _MODEL_CLASSES[arch]
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=1024,
        initializer_range=0.15,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    config = config_cls(**kwargs)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.config._name_or_path = f"tiny-random-{arch}"  # what name-based lookups (CompressKV calibrations) see
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


@pytest.fixture(scope="session")
def tiny_model():
    """Factory: ``tiny_model(arch)`` -> a cached tiny random model (one per architecture and session).

    Each architecture gets its own seed so that Llama and Mistral (same module layout) are different models.
    """
    cache: dict[str, torch.nn.Module] = {}

    def get(arch: str) -> torch.nn.Module:
        if arch not in cache:
            cache[arch] = build_model(arch, seed=ARCHS.index(arch) + 1)
        return cache[arch]

    return get


@pytest.fixture
def prompt():
    """Factory: ``prompt(n, seed=0)`` -> a (n,) long tensor of random token ids."""

    def make(n: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + seed)
        return torch.randint(0, VOCAB, (n,), generator=g)

    return make


@functools.cache
def method_config(name: str, overrides: tuple[str, ...] = ()) -> DictConfig:
    """The composed Hydra config of ``method=<name>`` (plus extra overrides), as the CLI would build it."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[f"method={name}", *overrides])


def load_method(name: str, overrides: tuple[str, ...] = ()):
    """Fresh (method, allocator) instances for ``conf/method/<name>.yaml`` (with its allocator override).

    A method that finds a per-model calibration by name (``calibration: auto``, CompressKV) is pointed at the
    calibrations of the tiny random models, computed once per session by ``tiny_calibration_dir``.
    """
    cfg = method_config(name, tuple(overrides))
    if cfg.method.get("calibration") == "auto":
        cfg = method_config(name, (*overrides, f"method.calibration={tiny_calibration_dir()}"))
    return instantiate(cfg.method), instantiate(cfg.allocator)


def is_episodic(name: str) -> bool:
    """Methods that build several caches per context with probes (EpiCache) instead of compressing in prefill."""
    return get_class(method_config(name).method._target_).episodic


def is_var(name: str) -> bool:
    """Methods of visual autoregressive models (HACK): they run on kvbench.var (tests/test_var_*.py), not here."""
    return get_class(method_config(name).method._target_).family == "var"


METHODS = tuple(m for m in METHODS if not is_var(m))  # the text engine's methods
PREFILL_METHODS = tuple(m for m in METHODS if not is_episodic(m))  # compressed by Engine.forward(compress=True)


def layer_store(name: str) -> str:
    """The layer store a method declares (``Method.layer_store``): "evict" or "quantized"."""
    return get_class(method_config(name).method._target_).layer_store


# Quantising methods keep every token at reduced precision: their budget must be 1.0 (tests/test_quant.py covers
# their bytes and logits); the eviction tests run over the others.
QUANTIZED_METHODS = tuple(m for m in PREFILL_METHODS if layer_store(m) == "quantized")
EVICTING_METHODS = tuple(m for m in PREFILL_METHODS if layer_store(m) == "evict")


@functools.cache
def tiny_calibration_dir() -> Path:
    """CompressKV calibrations (``tiny-random-<arch>.json``) of the tiny random models (seeds as ``tiny_model``),
    computed with the calibration code of ``scripts/calibrate_compresskv.py`` on token-id needles (no tokenizer),
    counting every test (an untrained model retrieves nothing). About a second per architecture."""
    import atexit
    import shutil
    import tempfile

    from kvbench.calibration import compresskv as cal

    out = Path(tempfile.mkdtemp(prefix="kvbench-calibration-"))
    atexit.register(shutil.rmtree, out, True)
    for arch in ARCHS:
        model = build_model(arch, seed=ARCHS.index(arch) + 1)
        probes = cal.token_probes(VOCAB, [64], 1, seed=0, depths=[0.25, 0.75])
        srh = cal.retrieval_heads(model, probes, cal.token_reader(), max_new_tokens=3, min_recall=None)
        errors = cal.layer_errors(model, probes, srh["ranking"], cal.token_reader(), steps=2)
        info = cal.model_info(model, f"tiny-random-{arch}")
        (out / f"tiny-random-{arch}.json").write_text(cal.dumps(cal.record(info, srh, errors, {"tests": True})))
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run far faster on one intra-op thread (as the runner's threads=1 default)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's byte -> printable-character table (for a tiny CLIP vocabulary written here)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A CLIP model built offline from a config (random weights) with a byte-level vocabulary, saved as a folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out = tmp_path_factory.mktemp("clip")
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    text = {"vocab_size": 514, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(out)
    image = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image, tokenizer=tok).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_mask2former(tmp_path_factory) -> Path:
    """A COCO-instance-shaped Mask2Former (80 classes, random weights, tiny Swin backbone) built offline from a
    config, with its (PIL) image processor, saved as a folder."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    out = tmp_path_factory.mktemp("mask2former")
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                            num_attention_heads=2, num_queries=8, num_labels=80, common_stride=4)
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(out)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}, size_divisor=32).save_pretrained(out)
    return out

"""``run(cfg)``: one next-scale run (VAR or Infinity model x task x method x budget x seed) -> a run directory
with ``metrics.json``.

Every seed of the task generates one batch (one image per class or prompt) twice with the same sampling seed: with
the full cache (the reference) and with the method at the budget, on the same runner, and compares them. The run
directory is ``<results>/<task>/<model>/<method>/budget=<b>/seed=<s>`` (VAR methods decide their own per-row counts,
so the text runner's ``allocator`` and ``protocol`` are not part of it; ``metrics.json`` says so).

The directory is the text runner's ``kvbench.results.RunStore``: a lock held while it is written, a preflight that
writes nothing (another process's directory, another configuration, unreadable files: refused), ``config.yaml``
with the config hash, the method's input files (HACK's calibration) and the model files' identity
(``kvbench.identity``), ``metrics.json`` written atomically, last. A finished run is returned only when its inputs
are still the same; otherwise it is refused naming what differs (``overwrite=true`` replaces it).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from kvbench.budget import compression_ratio
from kvbench.errors import UsageError
from kvbench.identity import digest, file_digest
from kvbench.results import RunStore
from kvbench.tasks.geneval import metadata_file
from kvbench.var.baselines import var_method
from kvbench.var.bundle import Bundle, load_bundle
from kvbench.var.compress import VarMethod
from kvbench.var.generate import Generation
from kvbench.var.geneval import GenEval, load_geneval
from kvbench.var.geneval import summary as geneval_summary
from kvbench.var.load import ASSETS
from kvbench.var.metrics import (
    DISTRIBUTION,
    bit_agreement,
    clip_score,
    fidelity_metrics,
    load_clip,
    psnr,
    ssim,
    token_agreement,
)
from kvbench.var.task import VarTask


def run_dir(cfg: DictConfig) -> Path:
    return Path(str(cfg.paths.results)) / str(cfg.task.name) / str(cfg.model.name) / str(cfg.method.name) / \
        f"budget={cfg.budget}" / f"seed={cfg.seed}"


def check_model(spec: Any) -> None:
    if spec.get("family") != "var":
        raise UsageError(f"model {spec.name!r} is not a VAR model (family: var); e.g. model=kvbench-tiny-var")
    if str(spec.dtype) != "float32" or str(spec.attn_implementation) != "sdpa":
        raise UsageError("the VAR runner runs float32 with sdpa attention: set model.dtype=float32 "
                         "model.attn_implementation=sdpa")


def check_budget(budget: Any) -> float:
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not budget > 0:
        raise UsageError(f"budget={budget!r}: the VAR runner takes one positive number (<= 1: fraction of the "
                         "tokens seen, > 1: tokens per head); run several with -m budget=0.1,0.3")
    return float(budget)


def device_of(cfg: DictConfig) -> torch.device:
    name = str(cfg.get("device", "auto"))
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def compare(out: Generation, ref: Generation) -> dict[str, Any]:
    """Agreement of one batch with its reference."""
    bits = {"bit_agreement": bit_agreement(out.tokens, ref.tokens, out.token_bits).tolist()} if out.token_bits else {}
    return {"token_agreement": token_agreement(out.tokens, ref.tokens).tolist(), **bits,
            "psnr": psnr(out.image, ref.image), "ssim": ssim(out.image, ref.image),
            "peak_kv_bytes": out.cache.peak_bytes, "final_kv_bytes": out.cache.nbytes(),
            "full_peak_kv_bytes": ref.cache.peak_bytes, "full_final_kv_bytes": ref.cache.nbytes(),
            "condition_kv_bytes": out.cache.condition_bytes,
            "attention_s": [r.attention_s for r in out.cache.records],
            "full_attention_s": [r.attention_s for r in ref.cache.records],
            "entries_after": [r.entries_after for r in out.cache.records]}


def summarise(batches: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    agree = np.array([b["token_agreement"] for b in batches]).mean(0)  # (S,)
    ps, ss = sum((b["psnr"] for b in batches), []), sum((b["ssim"] for b in batches), [])
    mean = lambda key: float(np.mean([b[key] for b in batches]))  # noqa: E731
    att = np.array([b["attention_s"] for b in batches]).mean(0)
    full_att = np.array([b["full_attention_s"] for b in batches]).mean(0)
    bits = {}
    if "bit_agreement" in batches[0]:
        by_scale = np.array([b["bit_agreement"] for b in batches]).mean(0)
        bits = {"bit_agreement": float((by_scale * np.array(sizes)).sum() / sum(sizes)),
                "bit_agreement_by_scale": by_scale.round(6).tolist()}
    return {**bits, "score": {"token_agreement": float((agree * np.array(sizes)).sum() / sum(sizes)),
                      "psnr": float(np.mean(ps)), "ssim": float(np.mean(ss))},
            "token_agreement_by_scale": agree.round(6).tolist(),
            "identical_images": int(sum(p == 100.0 for p in ps)), "images": len(ps),
            "peak_kv_bytes": mean("peak_kv_bytes"), "final_kv_bytes": mean("final_kv_bytes"),
            "full_peak_kv_bytes": mean("full_peak_kv_bytes"), "full_final_kv_bytes": mean("full_final_kv_bytes"),
            "condition_kv_bytes": mean("condition_kv_bytes"),  # cross-attention K/V of the text (Infinity), apart
            "attention_ms_by_scale": (att * 1e3).round(4).tolist(),
            "attention_time_ratio": float(att.sum() / full_att.sum()),  # reference and method interleaved per seed
            "full_attention_ms_by_scale": (full_att * 1e3).round(4).tolist(),
            "batches": batches}


def save_grid(path: Path, ref: torch.Tensor, out: torch.Tensor, zoom: int = 4) -> None:
    """PNG: the reference images in the top row, the method's below (nearest-neighbour zoom)."""
    rows = [torch.cat(list(x.clamp(0, 1)), dim=2) for x in (ref, out)]  # each (3, H, B W)
    grid = torch.cat(rows, dim=1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST).save(path)


def save_images(folder: Path, images: torch.Tensor, seed: int, task: VarTask) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        arr = img.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        Image.fromarray(arr).save(folder / task.image_name(seed, i))


@dataclass
class Setup:
    """Everything a run needs, checked before its directory is touched."""

    bundle: Bundle
    task: VarTask
    method: Any
    scorer: VarMethod
    budget: float
    device: torch.device
    distribution: list[str]
    clip: tuple[Any, Any] | None = None  # CLIPModel, CLIPProcessor when the task asks for clip_score or geneval
    geneval: GenEval | None = None


def setup(cfg: DictConfig, method: Any) -> Setup:
    """``method``: the instantiated ``conf/method`` object."""
    budget = check_budget(cfg.budget)
    if cfg.get("threads") is not None:
        torch.set_num_threads(int(cfg.threads))
    device = device_of(cfg)
    bundle = load_bundle(cfg.model, device)
    task = VarTask.from_cfg(cfg.task, bundle.condition, bundle.num_classes)
    blocks, heads, _ = bundle.shape
    scorer = var_method(method, blocks, heads)
    wanted = [m for m in task.metrics if m in DISTRIBUTION]
    if wanted:  # fail before generating anything when the packages are missing
        fidelity_metrics(wanted, None, task.fid_reference, check_only=True)
    clip = load_clip(str(task.clip_model)) if {"clip_score", "geneval"} & set(task.metrics) else None
    geneval = (load_geneval(str(task.geneval_detector), clip, dict(task.geneval), device)
               if "geneval" in task.metrics else None)
    return Setup(bundle, task, method, scorer, budget, device, wanted, clip, geneval)


def generate_all(s: Setup, run_seed: int, out_dir: Path) -> list[dict[str, Any]]:
    """Per task seed: the reference and the method's batch with the same sampling seed, compared (and saved)."""
    batches, conditions = [], list(s.task.conditions)
    for k in s.task.seeds:
        seed = int(k) + 100_000 * run_seed
        ref = s.bundle.sample(conditions, seed, **s.task.sampling())
        out = s.bundle.sample(conditions, seed, method=s.scorer, budget=s.budget, **s.task.sampling())
        batches.append(compare(out, ref))
        if "clip_score" in s.task.metrics:  # the method's images and the full cache's, against their prompts
            batches[-1] |= {"clip_score": clip_score(out.image, conditions, s.clip),
                            "full_clip_score": clip_score(ref.image, conditions, s.clip)}
        if s.geneval is not None:
            batches[-1] |= {"geneval": geneval_rows(s, out.image, k), "full_geneval": geneval_rows(s, ref.image, k)}
        if s.task.save_images:
            save_grid(out_dir / f"grid_seed{k}.png", ref.image, out.image)
            save_images(out_dir / "images", out.image, k, s.task)
    return batches


def geneval_rows(s: Setup, images: torch.Tensor, seed: int) -> list[dict[str, Any]]:
    """GenEval's result row of each image of one seed's batch (one image per prompt)."""
    return [{"image": s.task.image_name(seed, i), **s.geneval.score(img, meta)}
            for i, (img, meta) in enumerate(zip(images, s.task.metadata, strict=True))]


def model_files(spec: Any) -> dict[str, Any]:
    """The model files' identity: the embedded model's config.json and weights, or the checkpoint files
    (``kvbench.identity``'s digest: large files by size and their first and last MiB)."""
    pretrained = str(spec.pretrained)
    if pretrained.startswith("embedded:"):
        folder = ASSETS / pretrained.removeprefix("embedded:")
        files = [folder / "config.json", folder / "model.safetensors"]
    else:
        files = [Path(str(p)) for p in (spec.pretrained, spec.get("vae")) if p]
    return {"local": digest([file_digest(p) for p in files if p.is_file()])}


def task_files(task: Any) -> dict[str, str] | None:
    """The identity of the task's data file (GenEval's metadata), or None for tasks whose prompts are the config."""
    path = metadata_file(task)
    return {"metadata": file_digest(path)} if path is not None and path.is_file() else None


def resolved(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def run(cfg: DictConfig) -> dict[str, Any]:
    check_model(cfg.model)
    store = RunStore(run_dir(cfg), resolved(cfg))
    if cfg.get("overwrite", False):
        store.discard()
    store.preflight()  # writes nothing: another process's directory, another config, unreadable files
    method = instantiate(cfg.method)
    identity = {"inputs": method.inputs(), "model": model_files(cfg.model), "data": task_files(cfg.task)}
    if store.complete and not store.overwrite:
        store.check_inputs(**identity)  # a finished run of other inputs is refused, naming what differs
        return store.load_metrics()
    s = setup(cfg, method)
    store.open(**identity)
    try:
        metrics = execute(cfg, s, store.dir)
        store.write_metrics(metrics)
    except BaseException as err:
        store.write_error(err)
        raise
    finally:
        store.unlock()
    return metrics


def execute(cfg: DictConfig, s: Setup, out_dir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    batches = generate_all(s, int(cfg.seed), out_dir)
    ours, full = ([row for b in batches for row in b.pop(key, [])] for key in ("geneval", "full_geneval"))
    sizes = [p * p for p in s.bundle.shape[2]]
    metrics = {"run": {"task": s.task.name, "model": str(cfg.model.name), "method": str(cfg.method.name),
                       "budget": s.budget, "seed": int(cfg.seed), "family": "var", "arch": s.bundle.arch,
                       "not_used": "allocator, protocol (VAR methods decide their own per-row counts)"},
               "compression_ratio": compression_ratio(s.budget, sum(sizes)),
               **summarise(batches, sizes), "inputs": s.method.inputs(),
               "wall_s": round(time.perf_counter() - t0, 3), "device": str(s.device)}
    if "clip_score" in s.task.metrics:
        metrics["clip_score"] = float(np.mean(sum((b["clip_score"] for b in batches), [])))
        metrics["full_clip_score"] = float(np.mean(sum((b["full_clip_score"] for b in batches), [])))
    if s.geneval is not None:  # the authors' results.jsonl rows of the method's images, and both summaries
        (out_dir / "geneval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ours))
        metrics["geneval"], metrics["full_geneval"] = geneval_summary(ours), geneval_summary(full)
    if s.distribution:
        metrics["fidelity"] = fidelity_metrics(s.distribution, out_dir / "images", s.task.fid_reference)
    return metrics


def report(metrics: dict[str, Any]) -> str:
    """The short table printed by ``python -m kvbench.var``."""
    r, s = metrics["run"], metrics["score"]
    mib = 2**20
    lines = [
        f"run        {r['task']} | {r['model']} | {r['method']} | budget {r['budget']} | seed {r['seed']}",
        f"agreement  tokens {100 * s['token_agreement']:.1f} %  (by scale: "
        + " ".join(f"{100 * a:.0f}" for a in metrics["token_agreement_by_scale"]) + ")"
        + (f", bits {100 * metrics['bit_agreement']:.1f} %" if "bit_agreement" in metrics else ""),
        f"images     PSNR {s['psnr']:.2f} dB  SSIM {s['ssim']:.4f}  ({metrics['identical_images']}/"
        f"{metrics['images']} identical to the full cache)",
        f"KV bytes   peak {metrics['peak_kv_bytes'] / mib:.3f} MiB (full {metrics['full_peak_kv_bytes'] / mib:.3f}),"
        f" final {metrics['final_kv_bytes'] / mib:.3f} MiB (full {metrics['full_final_kv_bytes'] / mib:.3f}),"
        " both CFG streams",
        f"attention  {sum(metrics['attention_ms_by_scale']):.1f} ms per batch "
        f"(full {sum(metrics['full_attention_ms_by_scale']):.1f} ms, ratio {metrics['attention_time_ratio']:.2f};"
        " runs interleaved)"]
    if "clip_score" in metrics:
        lines.insert(3, f"CLIP       score {metrics['clip_score']:.2f} (full cache {metrics['full_clip_score']:.2f})")
    if "geneval" in metrics:
        lines.insert(3, f"GenEval    overall {metrics['geneval']['overall']:.3f} (full cache "
                        f"{metrics['full_geneval']['overall']:.3f}; {metrics['geneval']['images']} images)")
    if metrics.get("condition_kv_bytes"):
        lines.insert(4, f"condition  text cross-attention K/V {metrics['condition_kv_bytes'] / mib:.3f} MiB "
                        "(both streams, computed once, not compressed; not in the KV bytes above)")
    return "\n".join(lines)

"""``run(cfg)``: one configuration end to end, resumable, with no Hydra global state (tests and notebooks call it)."""

from __future__ import annotations

import contextlib
import re
import resource
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvbench.budget import Allocator, check_budget, compression_ratio
from kvbench.engine import Engine
from kvbench.errors import UsageError
from kvbench.loggers import log_run
from kvbench.method import Method
from kvbench.models import load_model, load_tokenizer, pick_device
from kvbench.pipeline import PROTOCOLS, RunOptions, run_sample
from kvbench.prompt import POSTPROCESS, TRUNCATIONS
from kvbench.results import RunStore, record_failure
from kvbench.tasks import load_samples, needs_tokenizer
from kvbench.tasks.base import Sample

TIMING_KEYS = ("prefill_s", "compress_s", "question_s", "decode_s_per_token")
SIZE_KEYS = ("kept_fraction", "kv_bytes_full", "kv_bytes_kept", "compressed_tokens")


def validate(cfg: DictConfig) -> tuple[float, dict[str, Any]]:
    """Check the top-level keys a user types; returns the budget and the resolved config."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (MissingMandatoryValue, InterpolationToMissingValueError) as err:
        key = re.search(r"Missing mandatory value: (\S+)", str(err))
        raise UsageError(f"missing required setting {key.group(1) if key else err} (e.g. model=hf "
                         "model.pretrained=Qwen/Qwen2.5-7B-Instruct)") from None
    budget = check_budget(cfg.budget)
    if cfg.protocol not in PROTOCOLS:
        raise UsageError(f"protocol={cfg.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    chunk = cfg.get("prefill_chunk")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise UsageError(f"prefill_chunk must be a positive number of tokens or null, got {chunk!r}")
    return budget, resolved


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run (or resume, or return) the configuration's run directory; returns its metrics.

    A run that raises leaves ``error.json`` in its directory if it had claimed it (``kvbench.report status``
    lists it as failed); every run that returns is passed to the configured logger (``logger=``, none by default).
    A list of budgets (``budget=[0.1,0.2]``) is a budget sweep with one prefill per prompt (``kvbench.sweep``): it
    fills every budget's normal run directory and returns ``{budget: metrics}``.
    """
    if OmegaConf.is_list(cfg.get("budget")):
        from kvbench.sweep import run_sweep  # kvbench.sweep builds on this module

        return run_sweep(cfg)
    with failure_marked(cfg):
        metrics = execute(cfg)
    log_run(cfg, metrics)
    return metrics


@contextlib.contextmanager
def failure_marked(*cfgs: DictConfig) -> Iterator[None]:
    """On an exception, write ``error.json`` into each of these configurations' run directories they had claimed."""
    try:
        yield
    except Exception as err:
        for cfg in cfgs:
            with contextlib.suppress(Exception):  # the original error is what the user needs to see
                record_failure(cfg.run_dir, OmegaConf.to_container(cfg, resolve=True), err)
        raise


def execute(cfg: DictConfig) -> dict[str, Any]:
    """The run itself (``run`` without the failure marker and the logger)."""
    store, budget, finished = prepare(cfg)
    if finished is not None:
        return finished
    try:
        setup = load(cfg)
        store.open(setup.method.inputs())  # only a configuration that loaded claims (and locks) its run directory
        done = store.done_ids()
        todo = [s for s in setup.samples if any(f"{s.id}/{q.id}" not in done for q in s.questions)]
        torch.manual_seed(int(cfg.seed))
        with Engine(setup.model, setup.method, setup.allocator, budget,
                    backend=cfg.model.attn_implementation) as engine:
            for sample in progress(cfg, todo, len(setup.samples), f"{cfg.method.name} b={cfg.budget}"):
                for record in run_sample(engine, setup.tok, sample, setup.opts, done):
                    store.append(record)
        return finish(cfg, store, budget, setup)
    finally:
        store.unlock()


def prepare(cfg: DictConfig) -> tuple[RunStore, float, dict[str, Any] | None]:
    """Validate a configuration and check its run directory: the store, the budget, and the stored metrics if the
    run is already finished (None if there is work to do)."""
    budget, resolved = validate(cfg)
    store = RunStore(cfg.run_dir, resolved)
    if cfg.overwrite:
        store.discard()
    store.check()  # refuses a directory that holds another configuration, finished or not
    if store.complete and store.load_metrics().get("limit") == cfg.limit:
        metrics = store.load_metrics()
        print(f"[kvbench] already finished: {store.dir}", file=sys.stderr)
        print(format_table(metrics, cfg.run_dir))
        return store, budget, metrics
    return store, budget, None


@dataclass
class Setup:
    """What a run loads once: the method, allocator, samples, device, model, tokenizer and run options."""

    method: Method
    allocator: Allocator
    samples: list[Sample]
    device: torch.device
    model: PreTrainedModel
    tok: PreTrainedTokenizerBase
    opts: RunOptions


def load(cfg: DictConfig) -> Setup:
    """Build the method and allocator, load the samples and the model (threads set), and the run options."""
    method, allocator = build(cfg.method, "method"), build(cfg.allocator, "allocator")
    if getattr(method, "episodic", False) and cfg.protocol != "query_agnostic":
        raise UsageError(f"method={cfg.method.name} answers many questions over per-episode caches of one context; "
                         "run it with protocol=query_agnostic")
    if hasattr(allocator, "check_method"):  # an allocator that reads one method's ctx.memo (taskkv) refuses others
        allocator.check_method(method)
    tok = load_tokenizer(cfg.model) if needs_tokenizer(cfg.task) else None  # tasks built in the model's tokens
    samples = load_samples(cfg.task, cfg.limit, tokenizer=tok)
    device = pick_device(str(cfg.device))
    if device.type == "cpu" and cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    model, tok = load_model(cfg.model, device, tokenizer=tok)
    if hasattr(method, "prepare"):  # a method with per-model data (CompressKV's calibration) checks it for this model
        method.prepare(model)
    return Setup(method, allocator, samples, device, model, tok, run_options(cfg, model))


def progress(cfg: DictConfig, todo: list[Sample], total: int, desc: str) -> tqdm:
    """The samples to do, with a progress bar on stderr (``progress=false`` hides it)."""
    return tqdm(todo, desc=desc, unit="sample", disable=not cfg.progress, file=sys.stderr,
                initial=total - len(todo), total=total)


def finish(cfg: DictConfig, store: RunStore, budget: float, setup: Setup) -> dict[str, Any]:
    """Aggregate the run's records over exactly the requested samples, write metrics.json, print the table."""
    wanted = {s.id for s in setup.samples}  # a different limit re-aggregates over exactly the requested samples
    records = [r for r in store.records() if r["sample_id"] in wanted]
    metrics = aggregate(records, store.cfg, budget, store.hash, setup.device)
    store.write_metrics(metrics)
    print(format_table(metrics, cfg.run_dir))
    return metrics


def run_options(cfg: DictConfig, model: Any) -> RunOptions:
    """Prompting, decoding and scoring options from the task and model configs (optional task keys documented in
    ``conf/task/longbench/*.yaml``: chat_template auto|never, tokenize, truncation, postprocess, eos_strings,
    min_new_tokens; model keys chat_special_tokens, chat_template_kwargs)."""
    task, mcfg = cfg.task, cfg.model
    chat_policy = task.get("chat_template", "auto")
    if chat_policy not in ("auto", "never"):
        raise UsageError(f"task.chat_template={chat_policy!r}; choose auto (follow model.chat_template) or never")
    if task.get("truncation", "context") not in TRUNCATIONS:
        raise UsageError(f"task.truncation={task.truncation!r}; choose one of {', '.join(TRUNCATIONS)}")
    if task.get("tokenize", "separate") not in ("separate", "joint"):
        raise UsageError(f"task.tokenize={task.tokenize!r}; choose separate or joint")
    steps = list(task.get("postprocess", ["strip"]))
    if any(s not in POSTPROCESS for s in steps):
        raise UsageError(f"task.postprocess={steps}; steps must be among {', '.join(POSTPROCESS)}")
    if int(task.get("min_new_tokens", 0)) not in (0, 1):
        raise UsageError("task.min_new_tokens must be 0 or 1 (end-of-sequence suppressed on the first token)")
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    return RunOptions(
        protocol=cfg.protocol, max_new_tokens=int(task.max_new_tokens), stop=list(task.stop),
        metrics=list(task.metrics), chat=bool(mcfg.chat_template) and chat_policy != "never",
        max_length=mcfg.get("max_length"), prefill_chunk=cfg.get("prefill_chunk"),
        tokenize=task.get("tokenize", "separate"), truncation=task.get("truncation", "context"),
        chat_special_tokens=bool(mcfg.get("chat_special_tokens", False)),
        chat_kwargs=dict(mcfg.get("chat_template_kwargs") or {}), postprocess=steps,
        eos_ids=[eos] if isinstance(eos, int) else list(eos or []), eos_strings=list(task.get("eos_strings", [])),
        min_new_tokens=int(task.get("min_new_tokens", 0)))


def build(node: DictConfig, what: str) -> Any:
    """Instantiate a config node, turning Hydra's wrapped errors into one clear message."""
    try:
        return instantiate(node)
    except InstantiationException as err:
        raise UsageError(f"invalid {what} configuration ({node.get('name', '?')}): {err.__cause__ or err}") from err


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def aggregate(records: list[dict[str, Any]], cfg: dict[str, Any], budget: float, cfg_hash: str,
              device: torch.device) -> dict[str, Any]:
    """Run-level metrics: scores x100 (mean over questions, also per context length and, when questions carry
    ``meta["category"]``, per category), sizes, times, memory."""
    names = list(records[0]["scores"]) if records else []
    score = {m: 100 * statistics.fmean(r["scores"][m] for r in records) for m in names}
    by_length: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        meta = r["meta"]  # LongBench-E's buckets come as meta["length_bucket"]
        by_length[str(meta.get("length_bucket", meta.get("target_length", meta.get("length", "all"))))].append(r)
    sizes = {k: _mean([r.get(k) for r in records]) for k in SIZE_KEYS}
    by_category: dict[str, list[dict]] = defaultdict(list)  # question categories (LoCoMo, LongMemEval, ...)
    for r in records:
        if r["meta"].get("category") is not None:
            by_category[str(r["meta"]["category"])].append(r)
    return {
        "task": cfg["task"]["name"], "model": cfg["model"]["name"], "method": cfg["method"]["name"],
        "allocator": cfg["allocator"]["name"], "protocol": cfg["protocol"], "budget": budget, "seed": cfg["seed"],
        "limit": cfg["limit"],
        "compression_ratio": compression_ratio(budget) if budget <= 1 else 1 - (sizes["kept_fraction"] or 1.0),
        "achieved_compression_ratio": 1 - (sizes["kept_fraction"] or 1.0),
        "n_samples": len({r["sample_id"] for r in records}), "n_questions": len(records),
        "score": score,
        "score_by_length": {k: {m: 100 * statistics.fmean(r["scores"][m] for r in rs) for m in names}
                            for k, rs in sorted(by_length.items(), key=lambda kv: (len(kv[0]), kv[0]))},
        **({"score_by_category": {k: {m: 100 * statistics.fmean(r["scores"][m] for r in rs) for m in names}
                                  for k, rs in sorted(by_category.items())}} if by_category else {}),
        **official_scores(records, cfg["task"]),
        **sizes,
        "peak_kv_bytes": max((r["peak_kv_bytes"] for r in records), default=None),
        "peak_mem_bytes": max((r["peak_mem_bytes"] for r in records if r["peak_mem_bytes"]), default=None),
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **{k: _mean([r.get(k) for r in records]) for k in TIMING_KEYS},
        "config_hash": cfg_hash,
        "env": {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(device)},
    }


def official_scores(records: list[dict[str, Any]], task: dict[str, Any]) -> dict[str, Any]:
    """``{"official": ...}`` from the task's ``official_scores`` hook (a dotted path to ``f(records, task)``, e.g.
    LongBench's eval.py rounding and LongBench-E buckets), or nothing."""
    hook = task.get("official_scores")
    return {"official": get_object(hook)(records, task)} if hook and records else {}


def format_table(m: dict[str, Any], run_dir: str | None = None) -> str:
    """A short human-readable summary of one run's metrics."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{1000 * v:.1f} ms"

    def mib(v: float | None) -> str:
        return "-" if v is None else f"{v / 2**20:.2f} MiB"

    score = "  ".join(f"{k}={v:.1f}" for k, v in m["score"].items())
    rows = [
        ("run", f"{m['task']} | {m['model']} | {m['method']} ({m['allocator']}) | {m['protocol']} | "
                f"budget {m['budget']}"),
        ("score", f"{score}   ({m['n_questions']} questions, {m['n_samples']} contexts)"),
        ("by length", "  ".join(f"{k}: {next(iter(v.values())):.1f}" for k, v in m["score_by_length"].items())),
        ("kept KV", f"{100 * (m['kept_fraction'] or 0):.1f} % of entries (compression_ratio "
                    f"{m['achieved_compression_ratio']:.3f})"),
        ("KV bytes", f"{mib(m['kv_bytes_full'])} full -> {mib(m['kv_bytes_kept'])} kept; "
                     f"peak {mib(m['peak_kv_bytes'])}"),
        ("time", f"prefill {ms(m['prefill_s'])} | compression {ms(m['compress_s'])} | "
                 f"decode {ms(m['decode_s_per_token'])}/token"),
    ]
    if m.get("score_by_category"):
        rows.insert(3, ("by category", "  ".join(f"{k}: {next(iter(v.values())):.1f}"
                                                 for k, v in m["score_by_category"].items())))
    if run_dir:
        rows.append(("run dir", str(run_dir)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

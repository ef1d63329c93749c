"""``run(cfg)``: the one execution path of kvbench, resumable, with no Hydra global state (tests and notebooks call it).

A single budget is a sweep of one: ``budget=0.2`` and ``budget=[0.1,0.2]`` go through the same steps, each once:

1. validation of every top-level key (:func:`kvbench.validate.check_config`; the CLI runs it before torch loads);
2. each budget's run directory checked, nothing written (busy, another configuration, unreadable files);
3. method and allocator built and checked together with the protocol, ``prefill_chunk`` and the model's
   capabilities (:func:`kvbench.compat.check_compatible`); the samples loaded, the data and model files identified;
4. finished runs with the same inputs returned as they are (other inputs are refused, naming what differs);
5. the model loaded once, then every unfinished run directory claimed (locked; ``overwrite=true`` replaces the old
   run only now);
6. the per-sample loop, budget after budget or with one shared prefill (:mod:`kvbench.sweep`); every answer is
   appended and flushed as soon as it is scored, under every protocol (:mod:`kvbench.protocols`);
7. metrics written per run; a failure marks (``error.json``) only the directories this process claimed and has not
   finished; every run that returns is passed to the configured logger (``logger=``, none by default).
"""

from __future__ import annotations

import contextlib
import functools
import resource
import statistics
import subprocess
import sys
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import kvbench
from kvbench import protocols
from kvbench.budget import Allocator, compression_ratio
from kvbench.compat import ENGINE_DEFAULT, ModelCapabilities, check_compatible
from kvbench.engine import Engine
from kvbench.engine.adapters import adapter_for
from kvbench.engine.engine import check_model
from kvbench.errors import UsageError
from kvbench.gguf import PREFIX as GGUF_PREFIX
from kvbench.identity import data_identity, model_identity
from kvbench.loggers import log_run
from kvbench.method import Method
from kvbench.models import load_model, load_tokenizer, load_vision_processors, pick_device, resolve_source
from kvbench.multimodal import VisionEncoder, vision_encoder
from kvbench.pipeline import RunOptions
from kvbench.results import ConfigMismatchError, CorruptRunError, RunDirBusyError, RunStore
from kvbench.schema import SIZE_KEYS, TIMING_KEYS
from kvbench.sweep import SweepEngine, budget_configs, fallback_reason, sweep_sample
from kvbench.tasks import load_samples, needs_tokenizer
from kvbench.tasks.base import Sample
from kvbench.validate import check_config, resolve

REFUSALS = (ConfigMismatchError, RunDirBusyError, CorruptRunError)  # another run's directory, not this run failing
validate = check_config  # the public name the experiment tests and notebooks use


def run(cfg: DictConfig, model_caps: ModelCapabilities = ENGINE_DEFAULT) -> dict[str, Any]:
    """Run (or resume, or return) the configuration's run directory; returns its metrics, or ``{budget: metrics}``
    for a list of budgets (``budget=[0.1,0.2]``, every budget in its normal run directory).

    ``model_caps``: what the engine supports for this model family (the per-family adapter declares it).
    """
    if cfg.model.get("family") == "var":  # next-scale image generation: its own runner over the same engine store
        from kvbench.var.run import run as run_var

        return run_var(cfg)
    check_config(cfg)
    configs = budget_configs(cfg)
    results = execute(cfg, configs, model_caps)
    for b, one in configs.items():
        log_run(one, results[b])
    return results if OmegaConf.is_list(cfg.budget) else results[next(iter(configs))]


@dataclass
class Job:
    """One budget's run: its configuration and run directory."""

    budget: float
    cfg: DictConfig
    store: RunStore


@dataclass
class Setup:
    """What a run loads once: the method, allocator, samples, tokenizer, and (for work to do) device, model and
    run options; ``data`` and ``model_id`` identify the inputs (:mod:`kvbench.identity`)."""

    method: Method
    allocator: Allocator
    samples: list[Sample]
    tok: PreTrainedTokenizerBase | None
    data: dict[str, str]
    model_id: dict[str, Any]
    device: torch.device | None = None
    model: PreTrainedModel | None = None
    opts: RunOptions | None = None


def execute(cfg: DictConfig, configs: dict[float, DictConfig],
            model_caps: ModelCapabilities = ENGINE_DEFAULT) -> dict[float, dict[str, Any]]:
    """Steps 2-7 of the module docstring for every budget's configuration; ``{budget: metrics}``."""
    jobs = [Job(b, one, RunStore(one.run_dir, resolve(one))) for b, one in configs.items()]
    for job in jobs:
        if cfg.overwrite:
            job.store.discard()
        job.store.preflight()
    setup = prepare(cfg, model_caps)
    results = {job.budget: m for job in jobs if (m := finished(job, setup)) is not None}
    todo = [job for job in jobs if job.budget not in results]
    if todo:
        load(cfg, setup)
        try:
            for job in todo:
                job.store.open(setup.method.inputs(), setup.data, setup.model_id)
            answer_all(cfg, setup, todo)
            results.update({job.budget: finish(job, setup) for job in todo})
        except Exception as err:
            for job in todo if not isinstance(err, REFUSALS) else []:  # a refusal is no failure of a run
                with contextlib.suppress(Exception):  # the original error is what the user needs to see
                    job.store.write_error(err)
            raise
        finally:
            for job in todo:
                job.store.unlock()
    return {job.budget: results[job.budget] for job in jobs}


def prepare(cfg: DictConfig, model_caps: ModelCapabilities = ENGINE_DEFAULT) -> Setup:
    """Build and check the method and allocator, load the samples (and the tokenizer a task is built with) and
    identify the data and model files; nothing is claimed and no model weights are loaded."""
    method, allocator = build(cfg.method, "method"), build(cfg.allocator, "allocator")
    family = cfg.model.get("family", "text")
    if method.family not in ("text", family):  # text methods also run on a vision-language model's language model
        raise UsageError(f"method={cfg.method.name} runs on {method.family} models (e.g. model=kvbench-tiny-"
                         f"{'vl' if method.family == 'vl' else 'var'}), not on {cfg.model.name}")
    check_compatible(method, allocator, str(cfg.protocol), cfg.get("prefill_chunk"), model_caps)
    gguf_sha = cfg.model.gguf.sha256 if str(cfg.model.pretrained).startswith(GGUF_PREFIX) else None
    source = None if gguf_sha else resolve_source(str(cfg.model.pretrained))  # a missing local path fails here
    if family not in ("text", "vl"):
        raise UsageError(f"model={cfg.model.name} is a {family!r} model, which this runner does not run")
    if family == "vl" and cfg.get("prefill_chunk"):
        raise UsageError(f"prefill_chunk cannot cut the prompts of the vision-language model {cfg.model.name} into "
                         "blocks (the model merges its image features in one forward); run without prefill_chunk")
    tok = load_tokenizer(cfg.model) if needs_tokenizer(cfg.task) else None  # tasks built in the model's tokens
    samples = load_samples(cfg.task, cfg.limit, tokenizer=tok)
    if family != "vl" and any(s.images or len(s.frames) for s in samples):
        raise UsageError(f"task={cfg.task.name} gives images or video frames, which the text model "
                         f"{cfg.model.name} cannot see (they would be dropped silently); use a vision-language model")
    return Setup(method, allocator, samples, tok, data_identity(samples),
                 {"gguf_sha256": gguf_sha} if gguf_sha else model_identity(source, cfg.model.get("revision")))


def finished(job: Job, setup: Setup) -> dict[str, Any] | None:
    """The stored metrics of a finished run with the same limit and inputs (None if there is work to do); a
    finished run of other data or model files is refused, naming what differs."""
    store = job.store
    if store.overwrite or not store.complete:
        return None
    store.check_inputs(None, setup.data, setup.model_id)
    metrics = store.load_metrics()
    if metrics.get("limit") != job.cfg.limit:
        return None
    print(f"[kvbench] already finished: {store.dir}", file=sys.stderr)
    print(format_table(metrics, job.cfg.run_dir))
    return metrics


def load(cfg: DictConfig, setup: Setup) -> None:
    """Load the model (threads set) and the run options into ``setup``; the method checks its per-model data."""
    setup.device = pick_device(str(cfg.device))
    if setup.device.type == "cpu" and cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    setup.model, setup.tok = load_model(cfg.model, setup.device, tokenizer=setup.tok)
    commit = getattr(setup.model.config, "_commit_hash", None)  # transformers records the hub commit it loaded
    if "hub" in setup.model_id and not setup.model_id.get("commit") and commit:
        setup.model_id = {**setup.model_id, "commit": commit}
    check_model(setup.model, setup.method)  # family and attention features, before a directory is claimed
    setup.method.prepare(setup.model)
    setup.opts = run_options(cfg, setup.model)
    if cfg.model.get("family", "text") == "vl":  # prompts carry their images / frames
        setup.opts.vision = load_vision(cfg.model, setup.model, setup.tok)


def load_vision(spec: DictConfig, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> VisionEncoder:
    """A vision-language model's prompt encoder (its image processor, LLaVA's processor)."""
    family = adapter_for(model).family
    image_processor, processor, source = load_vision_processors(spec, with_processor=family == "llava")
    return vision_encoder(model, tok, image_processor, source, processor)


def run_sample(engine: Engine, tok: PreTrainedTokenizerBase, sample: Sample, opts: RunOptions, skip: set[str]
               ) -> Iterator[dict[str, Any]]:
    """Every question of ``sample`` not in ``skip`` under the registered protocol, each record as it is scored."""
    todo = [q for q in sample.questions if f"{sample.id}/{q.id}" not in skip]
    protocol = protocols.get(protocols.protocol_name(opts.protocol, engine.method.episodic))
    return protocol(engine, tok, sample, todo, opts)


def answer_all(cfg: DictConfig, setup: Setup, jobs: list[Job]) -> None:
    """The per-sample loop: one shared prefill for several budgets where the method allows it, else budget after
    budget (a single budget is the second case); every record is appended as soon as it is scored."""
    done = {job.budget: job.store.done_ids() for job in jobs}
    reason = fallback_reason(cfg, setup.method, setup.allocator) if len(jobs) > 1 else "one budget"
    hook = history_hook(cfg, setup.samples)
    reason = reason or ("each prompt holds the model's own earlier outputs (history: model)" if hook else None)
    if len(jobs) > 1 and reason:
        print(f"[kvbench] budget sweep without a shared prefill: {reason}; running the budgets one after another",
              file=sys.stderr)
    if reason:
        for i, job in enumerate(jobs):
            method, allocator = (setup.method, setup.allocator) if i == 0 else rebuilt(cfg, setup)
            todo = [s for s in setup.samples if any(f"{s.id}/{q.id}" not in done[job.budget] for q in s.questions)]
            torch.manual_seed(int(cfg.seed))
            own = {r["sample_id"]: r["raw_prediction"] for r in job.store.predictions().records} if hook else {}
            with Engine(setup.model, method, allocator, job.budget, backend=cfg.model.attn_implementation) as engine:
                for sample in progress(cfg, todo, len(setup.samples), f"{cfg.method.name} b={job.cfg.budget}"):
                    for record in run_sample(engine, setup.tok, hook(sample, own) if hook else sample, setup.opts,
                                             done[job.budget]):
                        job.store.append(record)
                        own[record["sample_id"]] = record["raw_prediction"]
        return
    stores = {job.budget: job.store for job in jobs}
    todo = [s for s in setup.samples if any(f"{s.id}/{q.id}" not in ids for ids in done.values() for q in s.questions)]
    torch.manual_seed(int(cfg.seed))
    with SweepEngine(setup.model, setup.method, setup.allocator, list(stores), cfg.model.attn_implementation) as eng:
        desc = f"{cfg.method.name} b={','.join(str(j.cfg.budget) for j in jobs)} (shared prefill)"
        for sample in progress(cfg, todo, len(setup.samples), desc):
            for b, record in sweep_sample(eng, setup.tok, sample, setup.opts, done):
                stores[b].append(record)


def history_hook(cfg: DictConfig, samples: list[Sample]) -> Any:
    """The task's ``history_hook`` (a dotted path to ``f(sample, predictions) -> Sample``) when some sample's prompt
    is built from earlier samples' raw predictions (``meta["history_of"]``: AgentNetBench ``history: model``), else
    None. Samples then run in task order, budget after budget."""
    hook = cfg.task.get("history_hook")
    return get_object(hook) if hook and any(s.meta.get("history_of") for s in samples) else None


def rebuilt(cfg: DictConfig, setup: Setup) -> tuple[Method, Allocator]:
    """A fresh method and allocator for the next budget of a sweep without a shared prefill (no state carried)."""
    method, allocator = build(cfg.method, "method"), build(cfg.allocator, "allocator")
    method.prepare(setup.model)
    return method, allocator


def progress(cfg: DictConfig, todo: list[Sample], total: int, desc: str) -> tqdm:
    """The samples to do, with a progress bar on stderr (``progress=false`` hides it)."""
    return tqdm(todo, desc=desc, unit="sample", disable=not cfg.progress, file=sys.stderr,
                initial=total - len(todo), total=total)


def finish(job: Job, setup: Setup) -> dict[str, Any]:
    """Aggregate the run's records over exactly the requested samples, write metrics.json, print the table."""
    wanted = {s.id for s in setup.samples}  # a different limit re-aggregates over exactly the requested samples
    preds = job.store.predictions()
    if preds.n_duplicates:
        warnings.warn(f"{job.store.predictions_path}: {preds.n_duplicates} question(s) answered twice (a line "
                      "repeated by hand or by an older kvbench); each counts once, its last complete line",
                      stacklevel=2)
    records = [r for r in preds.records if r["sample_id"] in wanted]
    metrics = aggregate(records, job.store.cfg, job.budget, job.store.hash, setup.device, preds.n_duplicates)
    job.store.write_metrics(metrics)
    print(format_table(metrics, job.cfg.run_dir))
    return metrics


def run_options(cfg: DictConfig, model: Any) -> RunOptions:
    """Prompting, decoding and scoring options from the task and model configs (optional task keys documented in
    ``conf/task/longbench/*.yaml``: chat_template auto|never, tokenize, truncation, postprocess, eos_strings,
    min_new_tokens; model keys chat_special_tokens, chat_template_kwargs)."""
    task, mcfg = cfg.task, cfg.model  # the options were checked by kvbench.validate.check_task_options
    chat_policy = task.get("chat_template", "auto")
    steps = list(task.get("postprocess", ["strip"]))
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


@functools.cache
def build_info() -> dict[str, Any]:
    """kvbench's version and the git commit of the checkout it runs from (None outside a git checkout)."""
    root = Path(kvbench.__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"version": kvbench.__version__, "git_commit": commit, "git_dirty": None if dirty is None else bool(dirty)}


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def aggregate(records: list[dict[str, Any]], cfg: dict[str, Any], budget: float, cfg_hash: str,
              device: torch.device, n_duplicates: int = 0) -> dict[str, Any]:
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
        "n_duplicates": n_duplicates,
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
        "kvbench": build_info(),
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

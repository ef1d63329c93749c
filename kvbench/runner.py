"""``run(cfg)``: the one execution path of kvbench, resumable, with no Hydra global state (tests and notebooks call it;
a method grid composes its methods' configs with Hydra's compose API from the overrides it is given).

A single budget is a sweep of one: ``budget=0.2``, ``budget=[0.1,0.2]`` and a method grid
(``methods=[snapkv,adakv]``, each method composed as ``method=<name>``: :func:`kvbench.sweep.method_configs`) go
through the same steps, each once for the whole job:

1. validation of every top-level key (:func:`kvbench.validate.check_config`; the CLI runs it before torch loads);
2. each run's directory checked, nothing written (busy, another configuration, unreadable files);
3. every method and allocator built and checked together with the protocol, ``prefill_chunk`` and the model's
   capabilities (:func:`kvbench.compat.check_compatible`); the samples loaded, the data and model files identified;
4. finished runs with the same inputs returned as they are (other inputs are refused, naming what differs);
5. the model loaded once, then every unfinished run directory claimed (locked; ``overwrite=true`` replaces the old
   run only now);
6. the per-sample loop, with one shared prefill for the runs that allow it (:mod:`kvbench.sweep`), then run after
   run for the others; every answer is appended and flushed as soon as it is scored, under every protocol
   (:mod:`kvbench.protocols`);
7. metrics written per run; a failure marks (``error.json``) only the directories this process claimed and has not
   finished; every run that returns is passed to the configured logger (``logger=``, none by default).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import resource
import statistics
import subprocess
import sys
import warnings
from collections import defaultdict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
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
from kvbench.models import TORCHVISION, load_model, load_tokenizer, load_vision_processors, pick_device, resolve_source
from kvbench.multimodal import VisionEncoder, takes_video, vision_encoder
from kvbench.pipeline import RunOptions
from kvbench.results import ConfigMismatchError, CorruptRunError, RunDirBusyError, RunStore
from kvbench.schema import SIZE_KEYS, TIMING_KEYS
from kvbench.sweep import (
    SweepEngine,
    Variant,
    budget_configs,
    fallback_reason,
    method_configs,
    share_key,
    sweep_sample,
)
from kvbench.tasks import load_samples, needs_tokenizer
from kvbench.tasks.base import Sample
from kvbench.validate import check_budget, check_config, resolve

REFUSALS = (ConfigMismatchError, RunDirBusyError, CorruptRunError)  # another run's directory, not this run failing
validate = check_config  # the public name the experiment tests and notebooks use


def run(cfg: DictConfig, model_caps: ModelCapabilities = ENGINE_DEFAULT, overrides: Sequence[str] | None = None
        ) -> dict[Any, Any]:
    """Run (or resume, or return) the configuration's run directory; returns its metrics, or ``{budget: metrics}``
    for a list of budgets (``budget=[0.1,0.2]``, every budget in its normal run directory), or
    ``{(method, budget): metrics}`` for a method grid (``methods=[snapkv,adakv]``: each method's config composed
    as ``method=<name>`` with the job's ``overrides``, the command-line overrides; ``python -m kvbench`` passes
    them).

    ``model_caps``: what the engine supports for this model family (the per-family adapter declares it).
    """
    if cfg.model.get("family") == "var":  # next-scale image generation: its own runner over the same engine store
        from kvbench.var.run import run as run_var

        if cfg.get("methods") is not None:
            raise UsageError("methods=[...] grids run on text models; run VAR methods one per job (method=<name>)")
        return run_var(cfg)
    check_config(cfg)
    configs = job_configs(cfg, overrides)
    results = execute(cfg, configs, model_caps)
    for key, one in configs.items():
        log_run(one, results[key])
    if cfg.get("methods") is not None or OmegaConf.is_list(cfg.budget):
        return results
    return results[next(iter(configs))]


def job_configs(cfg: DictConfig, overrides: Sequence[str] | None = None) -> dict[Hashable, DictConfig]:
    """The runs of one job, each exactly the config of a run on its own: ``{budget: cfg}``, or for a method grid
    ``{(method, budget): cfg}`` (nothing is claimed or loaded; a bad method or budget is one UsageError)."""
    if cfg.get("methods") is None:
        return budget_configs(cfg)  # type: ignore[return-value]
    return {(name, b): one for name, grid in method_configs(cfg, overrides).items()
            for b, one in budget_configs(grid).items()}


@dataclass
class Job:
    """One run of a job: its budget, configuration and run directory. ``key`` names it in the results (the
    budget, or ``(method, budget)`` in a method grid) and ``method`` is the method option it runs."""

    budget: float
    cfg: DictConfig
    store: RunStore
    key: Hashable = None
    method: str = ""

    def __post_init__(self) -> None:
        self.key = self.budget if self.key is None else self.key
        self.method = self.method or str(self.cfg.method.name)


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
    built: dict[str, tuple[Method, Allocator]] = field(default_factory=dict)  # per method option of a grid

    def of(self, job: Job) -> tuple[Method, Allocator]:
        """The method and allocator ``job`` runs with (one instance per method, shared by its budgets)."""
        return self.built.get(job.method, (self.method, self.allocator))

    def opts_of(self, job: Job) -> RunOptions:
        """``job``'s run options: the job's, with its method's protocol (a method config may set it)."""
        assert self.opts is not None
        return dataclasses.replace(self.opts, protocol=str(job.cfg.protocol))


def execute(cfg: DictConfig, configs: dict[Any, DictConfig],
            model_caps: ModelCapabilities = ENGINE_DEFAULT) -> dict[Any, dict[str, Any]]:
    """Steps 2-7 of the module docstring for every run's configuration (``job_configs``); ``{key: metrics}``."""
    jobs = [Job(check_budget(one.budget), one, RunStore(one.run_dir, resolve(one)), key,
                key[0] if isinstance(key, tuple) else "") for key, one in configs.items()]
    check_distinct(jobs)
    for job in jobs:
        if cfg.overwrite:
            job.store.discard()
        job.store.preflight()
    cfg = jobs[0].cfg  # what the runs share (model, task, data, seed) is in every run's config
    setup = prepare(cfg, model_caps, {job.method: job.cfg for job in jobs})
    results = {job.key: m for job in jobs if (m := finished(job, setup)) is not None}
    todo = [job for job in jobs if job.key not in results]
    if todo:
        load(cfg, setup)
        try:
            for job in todo:
                job.store.open(setup.of(job)[0].inputs(), setup.data, setup.model_id)
            answer_all(cfg, setup, todo)
            results.update({job.key: finish(job, setup) for job in todo})
        except Exception as err:
            for job in todo if not isinstance(err, REFUSALS) else []:  # a refusal is no failure of a run
                with contextlib.suppress(Exception):  # the original error is what the user needs to see
                    job.store.write_error(err)
            raise
        finally:
            for job in todo:
                job.store.unlock()
    return {job.key: results[job.key] for job in jobs}


def check_distinct(jobs: list[Job]) -> None:
    """Every run of a job writes a run directory of its own."""
    seen: dict[Path, Job] = {}
    for job in jobs:
        if (other := seen.setdefault(job.store.dir, job)) is not job:
            raise UsageError(f"method={other.method} and method={job.method} would write the same run directory "
                             f"{job.store.dir} (one method.name); run them in separate jobs")


def prepare(cfg: DictConfig, model_caps: ModelCapabilities = ENGINE_DEFAULT,
            methods: dict[str, DictConfig] | None = None) -> Setup:
    """Build and check the method and allocator (of every method option in ``methods``, a method grid's configs;
    by default ``cfg``'s), load the samples (and the tokenizer a task is built with) and identify the data and model
    files; nothing is claimed and no model weights are loaded."""
    built = {name: build_method(one, model_caps) for name, one in (methods or {cfg.method.name: cfg}).items()}
    method, allocator = next(iter(built.values()))
    family = cfg.model.get("family", "text")
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
                 {"gguf_sha256": gguf_sha} if gguf_sha else model_identity(source, cfg.model.get("revision")),
                 built=built)


def build_method(cfg: DictConfig, model_caps: ModelCapabilities = ENGINE_DEFAULT) -> tuple[Method, Allocator]:
    """``cfg``'s method and allocator, built and checked together with its protocol, ``prefill_chunk`` and the
    model's capabilities."""
    method, allocator = build(cfg.method, "method"), build(cfg.allocator, "allocator")
    if method.family not in ("text", cfg.model.get("family", "text")):  # text methods also run on a VLM's decoder
        raise UsageError(f"method={cfg.method.name} runs on {method.family} models (e.g. model=kvbench-tiny-"
                         f"{'vl' if method.family == 'vl' else 'var'}), not on {cfg.model.name}")
    check_compatible(method, allocator, str(cfg.protocol), cfg.get("prefill_chunk"), model_caps)
    return method, allocator


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
    for method, _ in setup.built.values() or [(setup.method, setup.allocator)]:
        check_model(setup.model, method)  # family and attention features, before a directory is claimed
        method.prepare(setup.model)
    setup.opts = run_options(cfg, setup.model)
    if cfg.model.get("family", "text") == "vl":  # prompts carry their images / frames
        setup.opts.vision = load_vision(cfg.model, setup.model, setup.tok)


def load_vision(spec: DictConfig, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> VisionEncoder:
    """A vision-language model's prompt encoder (its image processor, LLaVA's processor)."""
    family = adapter_for(model).family
    video = TORCHVISION and takes_video(family, model.config.model_type)
    image_processor, processor, video_processor, source = load_vision_processors(spec, family == "llava", video)
    return vision_encoder(model, tok, image_processor, source, processor, video_processor)


def run_sample(engine: Engine, tok: PreTrainedTokenizerBase, sample: Sample, opts: RunOptions, skip: set[str]
               ) -> Iterator[dict[str, Any]]:
    """Every question of ``sample`` not in ``skip`` under the registered protocol, each record as it is scored."""
    todo = [q for q in sample.questions if f"{sample.id}/{q.id}" not in skip]
    protocol = protocols.get(protocols.protocol_name(opts.protocol, engine.method.episodic))
    return protocol(engine, tok, sample, todo, opts)


def answer_all(cfg: DictConfig, setup: Setup, jobs: list[Job]) -> None:
    """The per-sample loop: one shared prefill for the runs (budgets, or methods and budgets) that allow it, then
    the others one after another (a single run is the second case); every record is appended as soon as it is
    scored. ``cfg``: what the runs share (the per-method settings are read from each run's config)."""
    done = {job.key: job.store.done_ids() for job in jobs}
    hook = history_hook(cfg, setup.samples)
    groups, alone = plan(setup, jobs) if hook is None else ([], jobs)
    if hook is not None and len(jobs) > 1:
        print("[kvbench] no shared prefill: each prompt holds the model's own earlier outputs (history: model); "
              "running the runs one after another", file=sys.stderr)
    used: set[str] = set()  # methods already run: a later run of one gets a fresh instance (no state carried)
    for group in groups:
        answer_shared(setup, group, done)
        used.update(job.method for job in group)
    for job in alone:
        answer_alone(setup, job, done[job.key], fresh=job.method in used, hook=hook)
        used.add(job.method)


def plan(setup: Setup, jobs: list[Job]) -> tuple[list[list[Job]], list[Job]]:
    """The groups of runs that share one prefill (same prompt and cache layout, nothing that changes the prefill:
    ``kvbench.sweep.fallback_reason``) and the runs that run alone; one log line names those that could not share."""
    reasons = {job.key: fallback_reason(job.cfg, *setup.of(job)) for job in jobs}
    by_key: dict[tuple[str, str], list[Job]] = defaultdict(list)
    for job in jobs:
        if reasons[job.key] is None:
            by_key[share_key(job.cfg, setup.of(job)[0])].append(job)
    groups = [group for group in by_key.values() if len(group) > 1]
    shared = {job.key for group in groups for job in group}
    alone = [job for job in jobs if job.key not in shared]
    why = list(dict.fromkeys(r for job in alone if (r := reasons[job.key])))
    if len(jobs) > 1 and why:
        if len({job.method for job in jobs}) == 1:
            line = f"budget sweep without a shared prefill: {why[0]}; running the budgets one after another"
        else:
            names = ",".join(dict.fromkeys(job.method for job in alone if reasons[job.key]))
            line = (f"method grid: {names} without a shared prefill ({'; '.join(why)}); running them after the "
                    "shared prefill, one after another over the same model")
        print(f"[kvbench] {line}", file=sys.stderr)
    return groups, alone


def answer_alone(setup: Setup, job: Job, done: set[str], fresh: bool = False, hook: Any = None) -> None:
    """One run on the engine of its own; ``fresh``: with a new method and allocator instance; ``hook``: the task's
    ``history_hook``, rebuilding each sample from this run's earlier raw predictions (resumed ones included)."""
    method, allocator = rebuilt(job.cfg, setup) if fresh else setup.of(job)
    todo = [s for s in setup.samples if any(f"{s.id}/{q.id}" not in done for q in s.questions)]
    own = {r["sample_id"]: r["raw_prediction"] for r in job.store.predictions().records} if hook else {}
    torch.manual_seed(int(job.cfg.seed))
    with Engine(setup.model, method, allocator, job.budget, backend=job.cfg.model.attn_implementation) as engine:
        for sample in progress(job.cfg, todo, len(setup.samples), f"{job.cfg.method.name} b={job.cfg.budget}"):
            for record in run_sample(engine, setup.tok, hook(sample, own) if hook else sample, setup.opts_of(job),
                                     done):
                job.store.append(record)
                own[record["sample_id"]] = record["raw_prediction"]


def answer_shared(setup: Setup, group: list[Job], done: dict[Hashable, set[str]]) -> None:
    """The runs of ``group`` with one prefill per prompt (``kvbench.sweep.SweepEngine``)."""
    first, stores = group[0], {job.key: job.store for job in group}
    variants = {job.key: Variant(*setup.of(job), job.budget) for job in group}
    mine = {job.key: done[job.key] for job in group}
    todo = [s for s in setup.samples if any(f"{s.id}/{q.id}" not in ids for ids in mine.values() for q in s.questions)]
    methods = ",".join(dict.fromkeys(str(job.cfg.method.name) for job in group))
    desc = f"{methods} b={','.join(dict.fromkeys(str(job.cfg.budget) for job in group))} (shared prefill)"
    torch.manual_seed(int(first.cfg.seed))
    with SweepEngine.over(setup.model, variants, first.cfg.model.attn_implementation) as eng:
        for sample in progress(first.cfg, todo, len(setup.samples), desc):
            for key, record in sweep_sample(eng, setup.tok, sample, setup.opts_of(first), mine):
                stores[key].append(record)


def history_hook(cfg: DictConfig, samples: list[Sample]) -> Any:
    """The task's ``history_hook`` (a dotted path to ``f(sample, predictions) -> Sample``) when some sample's prompt
    is built from earlier samples' raw predictions (``meta["history_of"]``: AgentNetBench ``history: model``), else
    None. Samples then run in task order, run after run."""
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
        **method_stats(records),
        **sizes,
        "peak_kv_bytes": max((r["peak_kv_bytes"] for r in records), default=None),
        "peak_mem_bytes": max((r["peak_mem_bytes"] for r in records if r["peak_mem_bytes"]), default=None),
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **{k: _mean([r.get(k) for r in records]) for k in TIMING_KEYS},
        "config_hash": cfg_hash,
        "env": {"torch": torch.__version__, "transformers": transformers.__version__, "device": str(device)},
        "kvbench": build_info(),
    }


def method_stats(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{"method_stats": {stat: mean over questions of the mean over layers}}`` of the records' ``layer_stats``
    (layers that did not report a stat are left out of its mean), or nothing."""
    per_question: dict[str, list[float]] = defaultdict(list)
    for r in records:
        for name, values in (r.get("layer_stats") or {}).items():
            if reported := [v for v in values if v is not None]:
                per_question[name].append(statistics.fmean(reported))
    return {"method_stats": {k: statistics.fmean(v) for k, v in sorted(per_question.items())}} if per_question else {}


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
    if m.get("method_stats"):
        rows.append(("method", "  ".join(f"{k}={v:.3g}" for k, v in m["method_stats"].items())))
    if run_dir:
        rows.append(("run dir", str(run_dir)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

"""The results schema: one ``predictions.jsonl`` line per scored question, one ``metrics.json`` per finished run.

Both are ``TypedDict``s; fields marked ``Annotated[..., SIZE | TIMING | PEAK]`` are the efficiency columns the
runner averages (or maxes) into ``metrics.json`` and the report summarises, and the key lists
(:data:`SIZE_KEYS`, :data:`TIMING_KEYS`, :data:`PEAK_KEYS`, :data:`EFFICIENCY_KEYS`) are derived from these
annotations, so a new column is declared here once. Units: seconds, bytes, fractions in [0, 1]; per-question
``scores`` are in [0, 1], run-level ``score`` is x100.
"""

from __future__ import annotations

from typing import Annotated, Any, NotRequired, TypedDict, get_type_hints

SIZE, TIMING, PEAK = "size", "timing", "peak"


class PredictionRecord(TypedDict):
    """One scored question (a line of ``predictions.jsonl``), keyed by ``id``: the last complete line of an id wins.

    ``prompt_hash``: sha256 (16 hex) of the prompt token ids the model was given (context + question; for the
    query-agnostic and episodic protocols the compressed context, then the appended question).
    """

    id: str  # "<sample_id>/<question_id>"
    sample_id: str
    question_id: str
    prediction: str  # post-processed answer that was scored
    raw_prediction: str  # decoded answer before stop strings and post-processing
    references: list[str]
    scores: dict[str, float]  # metric -> [0, 1]
    prompt_hash: str
    compressed_tokens: Annotated[int, SIZE]  # tokens of the compressed prompt
    kept_entries: int
    full_entries: int
    kept_fraction: Annotated[float, SIZE]
    kv_bytes_kept: Annotated[int, SIZE]
    kv_bytes_full: Annotated[int, SIZE]
    kept_per_layer: list[int]
    context_tokens: int
    question_tokens: int
    prefill_s: Annotated[float, TIMING]
    compress_s: Annotated[float, TIMING]
    question_s: NotRequired[Annotated[float, TIMING]]  # query-agnostic/episodic: the appended question's forward
    decode_s_per_token: Annotated[float | None, TIMING]
    new_tokens: int
    peak_kv_bytes_prefill: int
    peak_kv_bytes: Annotated[int, PEAK]
    peak_mem_bytes: Annotated[int | None, PEAK]  # CUDA only
    meta: dict[str, Any]  # the sample's and question's metadata (length, depth, category, ...)
    shared_prefill: NotRequired[bool]  # budget sweeps with one prefill (kvbench.sweep)
    shared_answer: NotRequired[bool]  # one answer for the budgets of a method that keeps the full cache (kvbench.sweep)
    episode: NotRequired[int]  # episodic: the routed episode
    n_episodes: NotRequired[int]
    layer_keep: NotRequired[list[int]]
    layer_stats: NotRequired[dict[str, list[float | None]]]  # what the method reported per layer while compressing


class BuildInfo(TypedDict):
    version: str  # kvbench.__version__
    git_commit: str | None  # of the kvbench checkout that ran (None outside a git checkout)
    git_dirty: bool | None


class RunMetrics(TypedDict):
    """A finished run's ``metrics.json`` (written atomically, last)."""

    task: str
    model: str
    method: str
    allocator: str
    protocol: str
    budget: float
    seed: int
    limit: int | None
    compression_ratio: float
    achieved_compression_ratio: float
    n_samples: int
    n_questions: int
    n_duplicates: int  # prediction lines superseded by a later line of the same id (counted once)
    score: dict[str, float]  # metric -> mean x100
    score_by_length: dict[str, dict[str, float]]
    score_by_category: NotRequired[dict[str, dict[str, float]]]
    official: NotRequired[dict[str, Any]]  # the task's official_scores hook
    # each per-layer statistic of the records' layer_stats, averaged over layers, then over questions (ZipVL:
    # prefill_attention_flops_saved, the fraction of the dense prefill attention FLOPs skipped, every layer alike)
    method_stats: NotRequired[dict[str, float]]
    kept_fraction: Annotated[float | None, SIZE]
    kv_bytes_full: Annotated[float | None, SIZE]
    kv_bytes_kept: Annotated[float | None, SIZE]
    compressed_tokens: Annotated[float | None, SIZE]
    peak_kv_bytes: Annotated[int | None, PEAK]
    peak_mem_bytes: Annotated[int | None, PEAK]
    process_max_rss_bytes: int
    prefill_s: Annotated[float | None, TIMING]
    compress_s: Annotated[float | None, TIMING]
    question_s: Annotated[float | None, TIMING]
    decode_s_per_token: Annotated[float | None, TIMING]
    config_hash: str
    env: dict[str, str]  # torch, transformers, device
    kvbench: BuildInfo


def _keys(td: type, kind: str) -> tuple[str, ...]:
    hints = get_type_hints(td, include_extras=True)
    return tuple(k for k, t in hints.items() if kind in getattr(_unwrap(t), "__metadata__", ()))


def _unwrap(t: Any) -> Any:
    """``NotRequired[Annotated[...]]`` -> ``Annotated[...]``."""
    args = getattr(t, "__args__", ())
    return args[0] if getattr(t, "__origin__", None) is NotRequired and args else t


SIZE_KEYS = _keys(RunMetrics, SIZE)
TIMING_KEYS = _keys(RunMetrics, TIMING)
PEAK_KEYS = _keys(RunMetrics, PEAK)
EFFICIENCY_KEYS = (*SIZE_KEYS, *PEAK_KEYS, *TIMING_KEYS)
RECORD_KEYS = tuple(get_type_hints(PredictionRecord))
REQUIRED_RECORD_KEYS = ("id",)  # what keys a line (its other fields are checked where they are used)

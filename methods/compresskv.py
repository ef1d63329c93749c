"""CompressKV: token selection by each layer's semantic retrieval heads, one shared token set per layer, with
error-aware layer budgets (the ``error_aware`` allocator)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from kvbench import model_slug
from kvbench.budget import Allocator
from kvbench.engine.context import LayerContext
from kvbench.errors import UsageError
from kvbench.identity import sha256_file
from kvbench.method import Method
from kvbench.ops import pool1d

FORMAT = "kvbench.compresskv.calibration"
VERSION = 1
#: Shipped calibrations, one ``<model-slug>.json`` per model (the slug of ``model.name``: ``org--name``).
CALIBRATION_DIR = Path(__file__).resolve().parents[1] / "kvbench" / "assets" / "calibration" / "compresskv"
#: Extra directory searched first by ``calibration: auto`` (e.g. shared storage on a cluster).
CALIBRATION_ENV = "KVBENCH_CALIBRATION_DIR"
CALIBRATE_CMD = "python scripts/calibrate_compresskv.py"
#: Where ``ctx.memo`` carries the layer error scores from the method to the ``error_aware`` allocator.
MEMO_KEY = "layer_error_scores"


# ---------------------------------------------------------------------------------------------------------------
# the two algorithms
# ---------------------------------------------------------------------------------------------------------------
def srh_scores(attn: Tensor, heads: list[int], kernel: int = 5, pooling: str = "avg") -> Tensor:
    """CompressKV's token scores of one layer (methods_core §4.1): (m,).

    attn: (H_q, w, m) window attention over the m non-window keys (model dtype, as the authors' fp16 softmax
    output). For each chosen query head the w window rows are summed, pooled along the keys (avg-pool k with zero
    padding, as ``F.avg_pool1d``), then the chosen heads are averaged: the same order of operations as the authors'
    ``compresskvCluster.update_kv``.
    """
    idx = torch.as_tensor(heads, dtype=torch.long, device=attn.device)
    summed = attn.index_select(0, idx).sum(1)  # (k, m)
    return pool1d(summed, kernel, pooling).mean(0)  # (m,)


def error_aware_budgets(u: list[float], total: int, lo: int, hi: int) -> list[int]:
    """CompressKV's ``error_aware_layer_budget_allocation`` (methods_core §4.2): tokens per layer, window included.

    Every layer starts at ``lo``; the rest R = total - L * lo is split as round(u_l * R) (half to even, as
    ``np.round``); each layer is clipped to [lo, hi]; the leftover is then handed out one token at a time, cycling
    over the layers below ``hi`` in descending u (or taken back from the layers above ``lo`` in ascending u when the
    rounding overshot), until the total is met or no layer can move. Ties in u go to the lower layer first (the
    authors' ``np.argsort`` does not promise an order for ties).
    """
    n = len(u)
    rest = total - lo * n
    budgets = [min(max(lo + round(x * rest), lo), hi) for x in u]
    diff = int(total - sum(budgets))
    while diff != 0:
        step = 1 if diff > 0 else -1
        movable = [i for i in range(n) if (budgets[i] < hi if step > 0 else budgets[i] > lo)]
        if not movable:
            break
        for i in sorted(movable, key=lambda j: (-u[j] if step > 0 else u[j], j)):
            budgets[i] += step
            diff -= step
            if diff == 0:
                break
    return budgets


# ---------------------------------------------------------------------------------------------------------------
# calibration files
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Calibration:
    """What CompressKV needs from a model's offline calibration.

    Attributes:
        heads: per layer, the query-head indices ranked by semantic-retrieval score, best first (all heads).
        layer_scores: per layer, the error score u (non-negative, sums to 1), or None (then only uniform or other
            allocators can be used).
        source: the file(s) it came from. meta: the rest of the file (model, data, settings).
    """

    heads: list[list[int]]
    layer_scores: list[float] | None
    source: str
    meta: dict[str, Any] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)  # {"calibration": sha256, "layer_scores": sha256}

    def check(self, n_layers: int, n_heads: int) -> None:
        """One clear message when the calibration belongs to a model of another shape."""
        shape = (len(self.heads), {len(h) for h in self.heads})
        if shape != (n_layers, {n_heads}) or (self.layer_scores is not None and len(self.layer_scores) != n_layers):
            raise UsageError(
                f"CompressKV calibration {self.source} is for a model with {len(self.heads)} layers x "
                f"{sorted(shape[1])} query heads, but this model has {n_layers} x {n_heads}; calibrate this model: "
                f"{CALIBRATE_CMD} --help")
        if any(sorted(h) != list(range(n_heads)) for h in self.heads):
            raise UsageError(f"{self.source}: every layer must rank each query head 0..{n_heads - 1} exactly once")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read CompressKV calibration {path}: {err}") from err


def _authors_layer_scores(path: Path) -> list[float]:
    """The authors' ``scores/<model>_layer_score.jsonl``: one JSON object (despite the suffix) with ``avg_score``."""
    data = _read_json(path)
    if not isinstance(data, dict) or "avg_score" not in data:
        raise UsageError(f"{path}: expected the authors' layer-score file with an 'avg_score' list")
    return [float(x) for x in data["avg_score"]]


def load_calibration(path: str | Path, layer_scores: str | Path | None = None) -> Calibration:
    """Read a kvbench calibration (``scripts/calibrate_compresskv.py``) or the authors' files.

    The authors' format (TUDa-HWAI/CompressKV ``scores/``): ``path`` is ``<model>_head_idx.json``
    ({"0": [heads of layer 0, best first], ...}) and ``layer_scores`` the matching ``<model>_layer_score.jsonl``.
    ``layer_scores`` also replaces the error scores of a kvbench file.
    """
    path = Path(path).expanduser()
    data = _read_json(path)
    if isinstance(data, dict) and data.get("format") == FORMAT:
        if data.get("version") != VERSION:
            raise UsageError(f"{path}: calibration version {data.get('version')}, this kvbench reads {VERSION}; "
                             f"re-run {CALIBRATE_CMD}")
        heads = [[int(h) for h in layer] for layer in data["srh"]["ranking"]]
        scores = data.get("layer_error", {}).get("scores")
        meta = {k: v for k, v in data.items() if k not in ("format", "version")}
    elif isinstance(data, dict) and data and all(k.isdigit() for k in data):
        heads = [[int(h) for h in data[str(i)]] for i in range(len(data))]
        scores, meta = None, {"format": "authors (TUDa-HWAI/CompressKV scores/*_head_idx.json)"}
    else:
        raise UsageError(f"{path} is neither a kvbench CompressKV calibration nor the authors' *_head_idx.json")
    source, digests = str(path), {"calibration": sha256_file(path)}
    if layer_scores is not None:
        scores = _authors_layer_scores(Path(layer_scores).expanduser())
        source += f" + {layer_scores}"
        digests["layer_scores"] = sha256_file(Path(layer_scores).expanduser())
    return Calibration(heads, [float(x) for x in scores] if scores is not None else None, source, meta, digests)


def calibration_name(name_or_path: str) -> str:
    """The file stem of a model's calibration: a local directory's name, else the hub id as ``org--name``."""
    if not name_or_path:
        return ""
    path = Path(name_or_path).expanduser()
    return path.resolve().name if path.is_dir() else model_slug(name_or_path)


def find_calibration(spec: str, slug: str) -> Path:
    """``auto`` or a directory: ``<slug>.json`` in $KVBENCH_CALIBRATION_DIR, then the shipped assets; else the path."""
    if spec != "auto" and not Path(spec).expanduser().is_dir():
        if not Path(spec).expanduser().is_file():
            raise UsageError(f"method.calibration={spec!r}: no such file or directory")
        return Path(spec).expanduser()
    if not slug:
        raise UsageError("CompressKV needs a calibration file, and this model has no name to find one by (built in "
                         "memory?): pass method.calibration=<file>")
    dirs = [Path(spec).expanduser()] if spec != "auto" else (
        [Path(os.environ[CALIBRATION_ENV])] if os.environ.get(CALIBRATION_ENV) else []) + [CALIBRATION_DIR]
    for d in dirs:
        if (d / f"{slug}.json").is_file():
            return d / f"{slug}.json"
    raise UsageError(
        f"no CompressKV calibration for model {slug!r} (looked for {slug}.json in {', '.join(map(str, dirs))}). "
        f"Identify its semantic retrieval heads and layer error scores first: {CALIBRATE_CMD} --model <model option> "
        "[--pretrained <hub id or path>] (see --help), or pass method.calibration=<file> (the authors' "
        "*_head_idx.json works too, with method.layer_scores=<*_layer_score.jsonl>)")


# ---------------------------------------------------------------------------------------------------------------
# the method and its allocator
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class CompressKV(Method):
    """CompressKV (https://arxiv.org/abs/2508.02401, code https://github.com/TUDa-HWAI/CompressKV), methods_core §4.

    Per layer l, the first ``first_k`` of the layer's semantic retrieval heads (query heads ranked offline by
    ``scripts/calibrate_compresskv.py``) score the tokens: window attention (last ``window`` queries, causal inside
    the window, fp32 softmax cast to the model dtype) summed over the window rows, avg-pooled (kernel 5) per head,
    then averaged over the chosen heads. The top tokens plus the window are kept, and **the same token set is applied
    to every KV head of the layer**. How many each layer keeps comes from the ``error_aware`` allocator (selected by
    ``conf/method/compresskv.yaml``) using the calibrated layer error scores. Prefill only, no decode eviction.

    Defaults are the authors' (``longbench/pred_compresskv.py``): window 8, avg-pool 5, first_k 4.

    Calibration (``calibration``): ``auto`` finds ``<model-slug>.json`` (the slug of the model's name or path, as
    in run directories) in $KVBENCH_CALIBRATION_DIR or ``kvbench/assets/calibration/compresskv/`` (kvbench-tiny's
    ships there); or a file or directory. The authors' published ``scores/<model>_head_idx.json`` (Llama-3.1-8B-
    Instruct, Mistral-7B-Instruct-v0.3) load too, with ``layer_scores=<model>_layer_score.jsonl`` for the error
    scores; note that the authors computed those layer scores on the LongBench *test* set itself, so LongBench
    numbers obtained with them are not held out. kvbench's own calibrations use generated data with seeds the
    evaluation tasks do not use.

    Deviations from the authors' code:
      * the selected indices are in token order (the authors' ``topk`` order is arbitrary; RoPE is baked into the
        keys, so order does not change attention) and ties go to the earlier token;
      * ``cache=query_head`` is refused: the token set is shared by all heads anyway, so it would only repeat it;
      * a model with fewer than ``first_k`` query heads uses all of them;
      * compression follows kvbench's budget rule: nothing is compressed when the average budget covers the prompt
        (the authors compress a layer whenever the prompt is at least its own budget B_l, even if the average B is
        above the prompt length); below that, a layer whose B_l covers its n tokens keeps them all, as theirs.

    On kvbench-tiny (``synth_multikey_dense``, query-aware, 32 questions) it scores 40.6 / 59.4 / 81.2 / 96.9 at
    budgets 0.05 / 0.1 / 0.2 / 0.5 (SnapKV's defaults: 50 / 100 / 100 / 100). The gap is mostly the authors'
    avg-pool 5, which gives the answer tokens next to the attended key a fifth of its score (``pooling=max
    kernel=7``: 100 at 0.1; SnapKV with window 8 and avg-pool 5: 71.9); the shared per-layer set costs the rest.
    The toy model has 4 query heads, so first_k = 4 uses them all and the head ranking only matters below that.

    Parameters:
        window: observation window, always kept (8). kernel: avg-pool kernel (5, odd). pooling: 'avg' | 'max'.
        first_k: semantic retrieval heads used per layer (4). calibration: 'auto' | file | directory.
        layer_scores: optional authors' ``*_layer_score.jsonl``, replacing the calibration's error scores.
    """

    name: str = "compresskv"
    window: int = 8
    kernel: int = 5
    pooling: str = "avg"
    first_k: int = 4
    calibration: str = "auto"
    layer_scores: str | None = None

    _cache: dict[str, Calibration] = field(default_factory=dict, init=False, repr=False, compare=False)

    compresses: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cache != "kv_head":
            raise UsageError("compresskv keeps one token set per layer shared by all KV heads; use cache=kv_head")
        pool1d(torch.zeros(1, 8), self.kernel, self.pooling)  # validates kernel and pooling with a clear message
        if isinstance(self.first_k, bool) or not isinstance(self.first_k, int) or self.first_k < 1:
            raise UsageError(f"first_k must be a positive number of heads, got {self.first_k!r}")
        if self.calibration != "auto" and not Path(str(self.calibration)).expanduser().exists():
            raise UsageError(f"method.calibration={self.calibration!r}: no such file or directory")
        if self.layer_scores is not None and not Path(self.layer_scores).expanduser().is_file():
            raise UsageError(f"method.layer_scores={self.layer_scores!r}: no such file")

    def load(self, name_or_path: str, n_layers: int, n_heads: int) -> Calibration:
        """The calibration for a model (by its ``name_or_path``), checked against its shape; cached."""
        slug = calibration_name(name_or_path)
        key = f"{slug}|{n_layers}|{n_heads}"
        if key not in self._cache:
            cal = load_calibration(find_calibration(str(self.calibration), slug), self.layer_scores)
            cal.check(n_layers, n_heads)
            self._cache[key] = cal
        return self._cache[key]

    def prepare(self, model: torch.nn.Module) -> None:
        """Called by the runner once the model is loaded: a missing or mismatched calibration fails before the run
        directory is claimed."""
        cfg = model.config.get_text_config()
        self.load(str(getattr(model.config, "_name_or_path", "") or ""), cfg.num_hidden_layers,
                  cfg.num_attention_heads)

    def inputs(self) -> dict[str, str]:
        """The SHA-256 of the calibration file(s) the run uses (recorded in the run directory)."""
        return {f"{k}_sha256": v for cal in self._cache.values() for k, v in cal.digests.items()}

    def score(self, ctx: LayerContext) -> Tensor:
        config = ctx.module.config
        cal = self.load(str(getattr(config, "_name_or_path", "") or ""), ctx.n_layers, ctx.queries.shape[0])
        if cal.layer_scores is not None:
            ctx.memo[MEMO_KEY] = cal.layer_scores
        s = srh_scores(ctx.window_attention(), cal.heads[ctx.layer_idx][: self.first_k], self.kernel, self.pooling)
        return s[None].expand(ctx.n_kv_heads, -1)  # (H_kv, n - w): one shared set per layer


@dataclass
class ErrorAware(Allocator):
    """CompressKV's error-aware layer budgets (methods_core §4.2; ``error_aware_budgets``).

    With B = the run's average tokens per head (``ctx.keep``, window included), layer l keeps B_l tokens (window
    included) from ``error_aware_budgets(u, B * L, min(min_tokens, B), max_factor * B)``, the same count for every
    KV head; u are the calibrated layer error scores the method leaves in ``ctx.memo`` (CompressKV does). A layer
    whose B_l covers its tokens keeps them all (the authors' "compress iff n >= B_l").

    Deviation: the floor is min(32, B) instead of 32, so that budgets below 32 tokens per head (small fractions on
    short prompts) still sum to B * L; at B >= 32 it is the authors' rule.
    """

    name: str = "error_aware"
    min_tokens: int = 32
    max_factor: float = 3.0

    def check_method(self, method: Method) -> None:
        """Refuse, before a run starts, a method that leaves no layer error scores (only CompressKV does)."""
        if not isinstance(method, CompressKV):
            raise UsageError(f"allocator=error_aware needs method=compresskv (its calibrated layer error scores), "
                             f"not {method.name!r}; choose another allocator")

    def allocate(self, scores: Tensor, keep: int, layer: int, n_layers: int,
                 ctx: LayerContext | None = None) -> Tensor:
        u = ctx.memo.get(MEMO_KEY) if ctx is not None else None
        if u is None:
            raise UsageError("allocator=error_aware needs calibrated layer error scores: use it with "
                             "method=compresskv and a calibration that has them (or choose another allocator)")
        if len(u) != n_layers:
            raise UsageError(f"{len(u)} layer error scores for a model with {n_layers} layers")
        h, m = scores.shape
        b = ctx.keep
        budgets = error_aware_budgets(list(u), b * n_layers, min(self.min_tokens, b), int(self.max_factor * b))
        count = min(max(budgets[layer] - (ctx.n - m), 0), m)  # minus the window the engine keeps anyway
        return torch.full((h,), count, dtype=torch.long)

"""The next-scale tasks: ``task=var_class`` (fixed classes, ``conf/task/var_class.yaml``),
``task=infinity_prompts`` (fixed text prompts, ``conf/task/infinity_prompts.yaml``) and ``task=geneval`` (GenEval's
prompts from its metadata file, ``conf/task/geneval.yaml``), each with fixed seeds.

A task gives the model's kind of condition (``classes`` for VAR, ``prompts`` for Infinity) and its sampling
settings; a task of the other kind is refused with one message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvbench.errors import UsageError
from kvbench.tasks.geneval import load_metadata, metadata_file
from kvbench.var.geneval import Settings
from kvbench.var.metrics import DISTRIBUTION, OFFLINE, TEXT

SAMPLING = {"classes": ("cfg", "top_k", "top_p"), "prompts": ("cfg", "tau", "top_k", "top_p")}
EXAMPLE = {"classes": "task=var_class", "prompts": "task=infinity_prompts"}


@dataclass(frozen=True)
class VarTask:
    """Every seed generates one batch with one image per condition (sampling seed = ``seed + 100000 * run seed``)."""

    name: str
    kind: str  # "classes" or "prompts"
    conditions: tuple[Any, ...]
    seeds: tuple[int, ...]
    settings: tuple[tuple[str, float], ...]
    metrics: tuple[str, ...]
    save_images: bool = True
    fid_reference: str | None = None
    clip_model: str | None = None
    metadata: tuple[dict[str, Any], ...] | None = None  # GenEval: one metadata line per prompt
    geneval_detector: str | None = None
    geneval: tuple[tuple[str, Any], ...] = ()  # GenEval's options (kvbench.var.geneval.Settings)

    @classmethod
    def from_cfg(cls, task: Any, kind: str | None = None, num_classes: int | None = None) -> VarTask:
        """``kind``: the model's condition (``Bundle.condition``; None: the task's own); ``num_classes`` bounds
        class labels."""
        meta_path = metadata_file(task)
        kind = kind or ("prompts" if task.get("prompts") is not None or meta_path else "classes")
        if task.get("family") != "var":
            raise UsageError(f"task {task.name!r} is not a VAR task (family: var, the next-scale runner); this model "
                             f"runs e.g. {EXAMPLE[kind]}")
        metadata = tuple(load_metadata(meta_path)) if meta_path is not None and kind == "prompts" else None
        if task.get(kind) is None and metadata is None:
            raise UsageError(f"task {task.name!r} has no {kind}, which this model is conditioned on; e.g. "
                             f"{EXAMPLE[kind]}")
        conditions = (tuple(m["prompt"] for m in metadata) if metadata else tuple(int(c) for c in task[kind])
                      if kind == "classes" else tuple(str(p) for p in task[kind]))
        settings = tuple((k, float(task[k]) if k != "top_k" else int(task[k])) for k in SAMPLING[kind])
        options = tuple(sorted((task.get("geneval") or {}).items()))
        out = cls(str(task.name), kind, conditions, tuple(int(s) for s in task.seeds), settings,
                  tuple(task.metrics), bool(task.get("save_images", True)), task.get("fid_reference"),
                  task.get("clip_model"), metadata, task.get("geneval_detector"), options)
        out.check(num_classes)
        return out

    def check(self, num_classes: int | None) -> None:
        bounded = self.kind == "classes" and num_classes is not None
        bad = [c for c in self.conditions if bounded and not 0 <= c < num_classes]
        if bad or not self.conditions or not self.seeds:
            bound = f" in [0, {num_classes})" if bounded else ""
            raise UsageError(f"task {self.name!r}: {self.kind} must be{bound} and non-empty, seeds non-empty; got "
                             f"{self.kind} {list(self.conditions)}, seeds {list(self.seeds)}")
        known = OFFLINE + DISTRIBUTION + TEXT
        unknown = [m for m in self.metrics if m not in known]
        if unknown:
            raise UsageError(f"task {self.name!r}: unknown metrics {unknown}; known: {list(known)}")
        if "clip_score" in self.metrics and (self.kind != "prompts" or not self.clip_model):
            raise UsageError(f"task {self.name!r}: clip_score needs text prompts and task.clip_model (a CLIP folder "
                             "or hub id, e.g. openai/clip-vit-large-patch14)")
        if "geneval" in self.metrics and not (self.metadata and self.geneval_detector and self.clip_model):
            raise UsageError(f"task {self.name!r}: geneval needs GenEval's metadata (task=geneval), "
                             "task.geneval_detector (a Mask2Former COCO-instance folder or hub id) and "
                             "task.clip_model (openai/clip-vit-large-patch14)")
        if unknown := sorted(set(dict(self.geneval)) - set(Settings.__dataclass_fields__)):
            raise UsageError(f"task {self.name!r}: unknown GenEval options {unknown}; known: "
                             f"{sorted(Settings.__dataclass_fields__)}")

    def sampling(self) -> dict[str, Any]:
        return dict(self.settings)

    def image_name(self, seed: int, index: int) -> str:
        if self.kind == "classes":
            return f"seed{seed}_class{self.conditions[index]}.png"
        return f"seed{seed}_prompt{index}.png"

"""``task=var_class``: class-conditional generation of fixed classes with fixed seeds (``conf/task/var_class.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvbench.errors import UsageError
from kvbench.var.metrics import DISTRIBUTION, OFFLINE


@dataclass(frozen=True)
class VarTask:
    """Every seed generates one batch with one image per class (sampling seed = ``seed + 100000 * run seed``)."""

    name: str
    classes: tuple[int, ...]
    seeds: tuple[int, ...]
    cfg: float
    top_k: int
    top_p: float
    metrics: tuple[str, ...]
    save_images: bool = True
    fid_reference: str | None = None

    @classmethod
    def from_cfg(cls, task: Any, num_classes: int) -> VarTask:
        if task.get("family") != "var":
            raise UsageError(f"task {task.name!r} is not a VAR task (family: var); VAR models run task=var_class")
        out = cls(str(task.name), tuple(int(c) for c in task.classes), tuple(int(s) for s in task.seeds),
                  float(task.cfg), int(task.top_k), float(task.top_p), tuple(task.metrics),
                  bool(task.get("save_images", True)), task.get("fid_reference"))
        bad = [c for c in out.classes if not 0 <= c < num_classes]
        unknown = [m for m in out.metrics if m not in OFFLINE + DISTRIBUTION]
        if bad or not out.classes or not out.seeds:
            raise UsageError(f"task {out.name!r}: classes must be in [0, {num_classes}) and seeds non-empty; got "
                             f"classes {list(out.classes)}, seeds {list(out.seeds)}")
        if unknown:
            raise UsageError(f"task {out.name!r}: unknown metrics {unknown}; known: {list(OFFLINE + DISTRIBUTION)}")
        return out

    def sampling(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "top_k": self.top_k, "top_p": self.top_p}

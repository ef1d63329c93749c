"""Tasks: a ``conf/task/*.yaml`` node names a loader (``_target_`` returning ``list[Sample]``), generation limits,
stop strings and metrics. ``load_task`` validates it and returns the samples."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from kvbench.errors import UsageError
from kvbench.metrics import get_metric
from kvbench.tasks.base import Question, Sample

__all__ = ["Question", "Sample", "load_samples"]


def load_samples(task: Any, limit: int | None = None) -> list[Sample]:
    """Instantiate the task's loader, check the samples, and keep the first ``limit``."""
    for name in task.metrics:
        get_metric(name)
    try:
        samples = list(instantiate(task.loader))
    except InstantiationException as err:
        raise UsageError(f"task {task.name!r} could not be loaded: {err.__cause__ or err}") from err
    if limit is not None:
        if int(limit) < 1:
            raise UsageError(f"limit must be a positive number of samples, got {limit}")
        samples = samples[: int(limit)]
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise UsageError(f"task {task.name!r} has duplicate sample ids")
    if not samples or any(not s.questions for s in samples):
        raise UsageError(f"task {task.name!r} produced no samples or a sample without questions")
    return samples

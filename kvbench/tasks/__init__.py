"""Tasks: a ``conf/task/*.yaml`` node names a loader (``_target_`` returning ``list[Sample]``), generation limits,
stop strings and metrics. ``load_samples`` validates it and returns the samples.

A loader that declares a ``tokenizer`` parameter (RULER and NeedleBench size their contexts in the evaluated
model's tokens) gets the run's tokenizer: ``needs_tokenizer(task)`` tells the runner to load it first."""

from __future__ import annotations

import inspect
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate

from kvbench.errors import UsageError
from kvbench.metrics import get_metric
from kvbench.tasks.base import Question, Sample

__all__ = ["Question", "Sample", "load_samples", "needs_tokenizer"]


def _parameters(task: Any) -> set[str]:
    try:
        target = get_object(task.loader._target_)
    except Exception as err:  # noqa: BLE001 - hydra raises several kinds for a bad _target_
        raise UsageError(f"task {task.name!r}: loader {task.loader._target_!r} cannot be imported: {err}") from err
    return set(inspect.signature(target).parameters)


def needs_tokenizer(task: Any) -> bool:
    """Whether the task's loader takes the evaluated model's tokenizer (a ``tokenizer`` parameter)."""
    return "tokenizer" in _parameters(task)


def load_samples(task: Any, limit: int | None = None, tokenizer: Any = None) -> list[Sample]:
    """Instantiate the task's loader (with ``tokenizer`` and ``limit`` if it takes them), check the samples, keep
    the first ``limit``."""
    for name in task.metrics:
        get_metric(name)
    extra: dict[str, Any] = {}
    if "limit" in _parameters(task) and limit is not None:  # generators can stop after the first `limit` samples
        extra["limit"] = int(limit)
    if needs_tokenizer(task):
        if tokenizer is None:
            raise UsageError(f"task {task.name!r} is built with the evaluated model's tokenizer; pass tokenizer=")
        extra["tokenizer"] = tokenizer
    try:
        samples = list(instantiate(task.loader, **extra))
    except InstantiationException as err:
        if isinstance(err.__cause__, UsageError):  # the loader's own clear message (e.g. DataMissingError), as is
            raise err.__cause__ from None
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

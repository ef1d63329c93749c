"""The documents of the ``kvbench_synth`` lm-eval task: kvbench's embedded ``synth_multikey_dense`` suite, one
document per question (context, question, answer), generated offline from ``conf/task/synth_multikey_dense.yaml``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TASK = "synth_multikey_dense"
CONF = Path(__file__).resolve().parents[2] / "conf"


def documents(task: str = TASK) -> list[dict[str, str]]:
    """One row per question of the kvbench task ``task`` (a ``conf/task`` option)."""
    from omegaconf import OmegaConf

    from kvbench.tasks import load_samples

    node = OmegaConf.load(CONF / "task" / f"{task}.yaml")
    return [{"context": s.context, "question": q.text, "answer": q.answers[0]}
            for s in load_samples(node) for q in s.questions]


def load(**_: Any) -> Any:
    """lm-eval's ``custom_dataset`` hook: a DatasetDict with the ``test`` split (lm-eval passes the task metadata)."""
    from datasets import Dataset, DatasetDict

    return DatasetDict({"test": Dataset.from_list(documents())})

"""Packaged fine-tuning tasks whose answers are checked exactly (used by `leanlm finetune` without --data).

A task makes deterministic, disjoint train/test splits of {"prompt", "completion"} records and
measures accuracy by greedy generation. Dispatch by a plain dict.
"""
from leanlm.data.tasks.dates import DATES
from leanlm.data.tasks.base import Task, accuracy

TASKS = {"dates": DATES}
DEFAULT_TASK = "dates"


def get_task(name: str) -> Task:
    from leanlm.errors import LeanLMError

    if name not in TASKS:
        raise LeanLMError(f"no packaged task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["Task", "TASKS", "DEFAULT_TASK", "get_task", "accuracy"]

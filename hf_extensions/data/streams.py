"""Class-incremental task streams (continual learning, incremental indexing).

A stream of ``num_tasks`` tasks with ``classes_per_task`` disjoint classes each, cut from one
``DatasetDict``: task ``t`` keeps, in every split, only the rows of its classes and gains a
``task_id`` column. Evaluating after task ``t`` on the test splits of tasks ``0..t`` fills the
accuracy matrix that ``hf_extensions.metrics`` turns into final average accuracy and forgetting.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import datasets
import numpy as np
from datasets import DatasetDict, concatenate_datasets

from hf_extensions.validation import check_integer, refuse


@dataclass
class TaskStream:
    """A list of per-task ``DatasetDict`` plus the classes each task introduces."""

    tasks: list[DatasetDict]
    task_classes: list[list[int]]

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> DatasetDict:
        return self.tasks[index]

    def __iter__(self) -> Iterator[DatasetDict]:
        return iter(self.tasks)

    def seen(self, task_index: int, split: str = "test"):
        """The rows of ``split`` of every task up to and including ``task_index`` (joint data)."""
        return concatenate_datasets([task[split] for task in self.tasks[: task_index + 1]])


def _rows_of_classes(ds, keep: set[int], label_column: str, task_id: int):
    rows = ds.select(np.flatnonzero(np.isin(np.asarray(ds[label_column]), sorted(keep))))
    # Selecting a few hundred rows needs no progress bar: silence datasets' bars, then restore.
    already_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return rows.flatten_indices().add_column("task_id", [task_id] * len(rows))
    finally:
        if not already_disabled:
            datasets.enable_progress_bars()


def class_incremental_stream(
    dataset: DatasetDict,
    num_tasks: int,
    classes_per_task: int | None = None,
    *,
    class_order: Sequence[int] | None = None,
    seed: int | None = None,
    label_column: str = "labels",
) -> TaskStream:
    """Cut ``dataset`` into a class-incremental stream.

    Task ``t`` takes the classes ``class_order[t * k : (t + 1) * k]``; classes after the first
    ``N * k`` are left out.

    Args:
        dataset (`datasets.DatasetDict`):
            The splits to cut; every task keeps, in every split, the rows of its classes, with
            a ``task_id`` column added.
        num_tasks (`int`):
            The number of tasks ``N``, at least 1.
        classes_per_task (`int`, *optional*, defaults to `None`):
            Classes per task ``k``; `None`: ``len(class_order) // num_tasks`` (all classes of
            the data unless ``class_order`` lists fewer).
        class_order (`Sequence[int]`, *optional*, defaults to `None`):
            Explicit order of classes (distinct, each present in the data); `None`: ascending,
            or a permutation drawn from ``seed`` when given.
        seed (`int`, *optional*, defaults to `None`):
            Seed of the class permutation (the usual "class order seed" of continual-learning
            papers); not used with ``class_order``. `None`: ascending order.
        label_column (`str`, *optional*, defaults to `"labels"`):
            The column holding the class labels.

    Returns:
        `TaskStream`: the per-task ``DatasetDict`` and the classes of each task.

    Raises:
        ValueError: a ``class_order`` with repeated or absent classes, ``num_tasks < 1``, or
            more classes needed (``N * k``) than available (or ``k < 1``).
    """
    labels = np.unique(np.concatenate([np.asarray(ds[label_column]) for ds in dataset.values()]))
    if class_order is None:
        class_order = labels.tolist()
        if seed is not None:
            class_order = np.random.default_rng(seed).permutation(class_order).tolist()
    class_order = [int(c) for c in class_order]
    if sorted(class_order) != sorted(set(class_order)) or not set(class_order) <= set(
        labels.tolist()
    ):
        raise ValueError(
            f"`class_order` must list distinct classes present in the data, got {class_order}."
        )
    num_tasks = check_integer("num_tasks", num_tasks, low=1)
    available = len(class_order)
    if classes_per_task is None:
        if num_tasks > available:
            refuse("num_tasks", f"at most the {available} classes available", num_tasks)
        classes_per_task = available // num_tasks
    else:
        classes_per_task = check_integer("classes_per_task", classes_per_task, low=1)
        if num_tasks * classes_per_task > available:
            refuse(
                "classes_per_task",
                f"at most {available // num_tasks} ({num_tasks} tasks x k classes out of the "
                f"{available} available)",
                classes_per_task,
            )
    task_classes = [
        class_order[t * classes_per_task : (t + 1) * classes_per_task] for t in range(num_tasks)
    ]
    tasks = [
        DatasetDict(
            {
                split: _rows_of_classes(ds, set(classes), label_column, task_id)
                for split, ds in dataset.items()
            }
        )
        for task_id, classes in enumerate(task_classes)
    ]
    return TaskStream(tasks=tasks, task_classes=task_classes)

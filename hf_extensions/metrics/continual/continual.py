"""Continual-learning metrics as a local `evaluate` metric.

One input row is one evaluated example: its prediction, its label, the training stage after
which it was evaluated (`stage_ids`: index i of the last task trained) and the task it belongs
to (`task_ids`: j). The module builds the accuracy matrix acc[i, j] and reports the three
summary figures; all formulas are in `hf_extensions.metrics.functional`. Stages can be added one
at a time with `add_batch` after each task and computed once at the end.
"""

import datasets
import evaluate

from hf_extensions.metrics import functional

_DESCRIPTION = (
    "Final average accuracy, average forgetting (Chaudhry et al., 2018) and average incremental "
    "accuracy (Rebuffi et al., 2017) from per-example evaluations after every training stage."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): reference labels.
    stage_ids (`list` of `int`): for each example, the index i of the last task trained before
        it was evaluated.
    task_ids (`list` of `int`): for each example, the index j of the task it belongs to.
        Examples with task_ids > stage_ids (tasks not trained yet) are ignored.
    num_tasks (`int`, optional): T; inferred from the ids when not given.
Returns:
    final_average_accuracy (`float`): mean_j acc[T-1, j].
    average_forgetting (`float`): mean_{j<T-1} (max_{j<=i<T-1} acc[i, j] - acc[T-1, j]).
    average_incremental_accuracy (`float`): mean_i mean_{j<=i} acc[i, j].
Examples:
    >>> metric = evaluate.load("hf_extensions/metrics/continual/continual.py")
    >>> metric.compute(predictions=[1, 1, 0], references=[1, 0, 0], stage_ids=[0, 1, 1],
    ...                task_ids=[0, 0, 1])
    {'final_average_accuracy': 0.5, 'average_forgetting': 1.0, 'average_incremental_accuracy': 0.75}
"""

_CITATION = """@inproceedings{chaudhry2018riemannian,
  title={Riemannian Walk for Incremental Learning: Understanding Forgetting and Intransigence},
  author={Chaudhry, Arslan and Dokania, Puneet K. and Ajanthan, Thalaiyasingam and Torr, Philip H. S.},
  booktitle={ECCV},
  year={2018}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Continual(evaluate.Metric):
    """Accuracy-matrix summaries of a continual-learning run."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "stage_ids": datasets.Value("int64"),
                    "task_ids": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/1801.10112"],
        )

    def _compute(
        self, predictions, references, stage_ids, task_ids, num_tasks: int | None = None
    ) -> dict[str, float]:
        acc = functional.accuracy_matrix(
            predictions, references, stage_ids, task_ids, num_tasks=num_tasks
        )
        return {
            "final_average_accuracy": functional.final_average_accuracy(acc),
            "average_forgetting": functional.average_forgetting(acc),
            "average_incremental_accuracy": functional.average_incremental_accuracy(acc),
        }

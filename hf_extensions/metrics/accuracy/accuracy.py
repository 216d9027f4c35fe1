"""Accuracy as a local `evaluate` metric; the formula is `hf_extensions.metrics.functional.accuracy`."""

import datasets
import evaluate

from hf_extensions.metrics import functional

_DESCRIPTION = "Fraction of examples whose predicted label equals the reference label."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): reference labels.
Returns:
    accuracy (`float`): in [0, 1].
Examples:
    >>> metric = evaluate.load("hf_extensions/metrics/accuracy/accuracy.py")
    >>> metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Top-1 accuracy of integer label predictions."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return {"accuracy": functional.accuracy(predictions, references)}

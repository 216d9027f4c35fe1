"""Negative log-likelihood as a local `evaluate` metric.

The formula is `hf_extensions.metrics.functional.negative_log_likelihood`.
"""

import datasets
import evaluate

from hf_extensions.metrics import functional

_DESCRIPTION = "Mean negative log-likelihood -log p[y] of the reference labels."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): per example, the class probabilities (or logits
        with `from_logits=True`).
    references (`list` of `int`): reference labels.
    from_logits (`bool`, defaults to `False`): use a numerically stable log-softmax.
    eps (`float`, defaults to 1e-12): probabilities are clipped below at `eps`.
Returns:
    nll (`float`): >= 0.
Examples:
    >>> metric = evaluate.load("hf_extensions/metrics/nll/nll.py")
    >>> metric.compute(predictions=[[0.5, 0.5], [0.25, 0.75]], references=[0, 1])
    {'nll': 0.490...}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class NegativeLogLikelihood(evaluate.Metric):
    """Mean NLL of probability (or logit) predictions."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.List(datasets.Value("float64")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(
        self, predictions, references, from_logits: bool = False, eps: float = 1e-12
    ) -> dict[str, float]:
        nll = functional.negative_log_likelihood(
            predictions, references, eps=eps, from_logits=from_logits
        )
        return {"nll": nll}

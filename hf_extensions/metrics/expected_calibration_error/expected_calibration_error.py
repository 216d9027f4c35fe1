"""Expected calibration error as a local `evaluate` metric (Guo et al., 2017).

The formula is `hf_extensions.metrics.functional.expected_calibration_error`.
"""

import datasets
import evaluate

from hf_extensions.metrics import functional

_DESCRIPTION = (
    "Expected calibration error: the bin-size weighted mean gap between accuracy and mean "
    "confidence (max probability) over equal-width confidence bins (lo, hi]."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): per example, the class probabilities (or logits
        with `from_logits=True`).
    references (`list` of `int`): reference labels.
    n_bins (`int`, defaults to 15): number of equal-width confidence bins.
    from_logits (`bool`, defaults to `False`): apply a softmax to `predictions` first.
Returns:
    ece (`float`): in [0, 1].
Examples:
    >>> metric = evaluate.load("hf_extensions/metrics/expected_calibration_error/expected_calibration_error.py")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[0, 0], n_bins=10)
    {'ece': 0.45}
"""

_CITATION = """@inproceedings{guo2017calibration,
  title={On Calibration of Modern Neural Networks},
  author={Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.},
  booktitle={ICML},
  year={2017}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExpectedCalibrationError(evaluate.Metric):
    """Equal-width-bin ECE of probability (or logit) predictions."""

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
            reference_urls=["https://arxiv.org/abs/1706.04599"],
        )

    def _compute(
        self, predictions, references, n_bins: int = 15, from_logits: bool = False
    ) -> dict[str, float]:
        ece = functional.expected_calibration_error(
            predictions, references, n_bins=n_bins, from_logits=from_logits
        )
        return {"ece": ece}

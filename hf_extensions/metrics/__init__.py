"""Metrics: a numpy functional core, local ``evaluate`` modules over it, and a Trainer hook.

- :mod:`hf_extensions.metrics.functional` holds every formula (re-exported here).
- Each sub-folder holds one ``evaluate`` module that calls the functional core; they load offline
  by path, and :func:`load_metric` resolves the project's names to those paths.
- :func:`compute_classification_metrics` is a ready ``Trainer(compute_metrics=...)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hf_extensions.metrics import functional
from hf_extensions.metrics.functional import (
    CalibrationBins,
    accuracy,
    accuracy_matrix,
    average_forgetting,
    average_incremental_accuracy,
    calibration_bins,
    expected_calibration_error,
    final_average_accuracy,
    hits_at_k,
    mrr_at_k,
    negative_log_likelihood,
    rank_from_scores,
)

__all__ = [
    "METRIC_MODULES",
    "CalibrationBins",
    "accuracy",
    "accuracy_matrix",
    "average_forgetting",
    "average_incremental_accuracy",
    "calibration_bins",
    "compute_classification_metrics",
    "expected_calibration_error",
    "final_average_accuracy",
    "hits_at_k",
    "load_metric",
    "metric_module_path",
    "mrr_at_k",
    "negative_log_likelihood",
    "rank_from_scores",
]

_HERE = Path(__file__).resolve().parent

#: Project metric name (and aliases) -> folder holding ``<folder>/<folder>.py``.
METRIC_MODULES: dict[str, str] = {
    "accuracy": "accuracy",
    "expected_calibration_error": "expected_calibration_error",
    "ece": "expected_calibration_error",
    "nll": "nll",
    "negative_log_likelihood": "nll",
    "continual": "continual",
    "retrieval": "retrieval",
}


def metric_module_path(name: str) -> Path:
    """Path of the local ``evaluate`` module file for a project metric name."""
    if name not in METRIC_MODULES:
        raise ValueError(
            f"unknown metric name {name!r}; available: {sorted(METRIC_MODULES)}. "
            "(Hub metrics such as evaluate's own need `evaluate.load` and network access.)"
        )
    folder = METRIC_MODULES[name]
    return _HERE / folder / f"{folder}.py"


def load_metric(name: str, **kwargs: Any):
    """``evaluate.load`` one of the project's metrics by name, offline.

    ``kwargs`` go to ``evaluate.load`` (``experiment_id``, ``num_process``, ``process_id``,
    ``keep_in_memory``, ...). Returns an ``evaluate.EvaluationModule``.
    """
    import evaluate  # deferred: the functional core must not pay for importing evaluate

    return evaluate.load(str(metric_module_path(name)), **kwargs)


def compute_classification_metrics(eval_pred: Any, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL and ECE from a ``transformers.EvalPrediction`` of logits and labels.

    Usable as ``Trainer(compute_metrics=compute_classification_metrics)``. Accepts an
    ``EvalPrediction`` or a ``(logits, labels)`` pair; when the model returns several outputs
    (a tuple) the first is taken as the logits. Examples labelled ``-100`` (the ignore index of
    transformers' losses) are left out.
    """
    if hasattr(eval_pred, "predictions") and hasattr(eval_pred, "label_ids"):
        logits, labels = eval_pred.predictions, eval_pred.label_ids
    else:
        logits, labels = eval_pred
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits of shape (N, C) and labels of shape (N,), got {logits.shape} and "
            f"{labels.shape}."
        )
    keep = labels != -100
    logits, labels = logits[keep], labels[keep]
    return {
        # Through `functional`: importing the evaluate module folders `metrics/accuracy/` or
        # `metrics/expected_calibration_error/` as packages (pkgutil.walk_packages does) rebinds
        # this package's `accuracy` / `expected_calibration_error` to those submodules.
        "accuracy": functional.accuracy(logits.argmax(axis=-1), labels),
        "nll": functional.negative_log_likelihood(logits, labels, from_logits=True),
        "ece": functional.expected_calibration_error(
            logits, labels, n_bins=n_bins, from_logits=True
        ),
    }

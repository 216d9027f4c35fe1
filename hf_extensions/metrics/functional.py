"""Metric mathematics, written once, in numpy.

Every metric of the project is computed here: the local ``evaluate`` modules next to this file,
``compute_classification_metrics`` and the benchmarks all call these functions, so that one
formula has one implementation. Inputs may be numpy arrays, (nested) lists or torch tensors.

Families:

- classification: :func:`accuracy`, :func:`negative_log_likelihood`,
  :func:`calibration_bins` / :func:`expected_calibration_error` (Guo et al., 2017);
- continual learning, from an accuracy matrix ``acc[i, j]`` (accuracy on task ``j`` after
  training task ``i``): :func:`final_average_accuracy`, :func:`average_forgetting`
  (Chaudhry et al., 2018), :func:`average_incremental_accuracy` (Rebuffi et al., 2017), and
  :func:`accuracy_matrix` to build that matrix from per-example predictions;
- retrieval: :func:`hits_at_k`, :func:`mrr_at_k` and :func:`rank_from_scores`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import log_softmax, softmax

from hf_extensions.validation import check_integer, refuse

__all__ = [
    "CalibrationBins",
    "accuracy",
    "accuracy_matrix",
    "average_forgetting",
    "average_incremental_accuracy",
    "calibration_bins",
    "expected_calibration_error",
    "final_average_accuracy",
    "hits_at_k",
    "mrr_at_k",
    "negative_log_likelihood",
    "rank_from_scores",
]


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------


def _to_numpy(x: Any, name: str, dtype: Any = None) -> np.ndarray:
    """Convert a numpy array, list or torch tensor to a numpy array (``name`` is for errors)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch
        x = x.detach().cpu()
        if getattr(x, "is_floating_point", lambda: False)():
            x = x.double()  # bfloat16 has no numpy dtype
        x = x.numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` could not be converted to a numeric array: {err}") from err


def _labels(x: Any, name: str) -> np.ndarray:
    """A non-empty 1-D integer label array."""
    arr = _to_numpy(x, name)
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D (one label per example), got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError(f"`{name}` is empty.")
    if arr.dtype.kind not in "iub":
        if arr.dtype.kind != "f" or not np.all(np.mod(arr, 1) == 0):
            raise ValueError(f"`{name}` must hold integer labels, got dtype {arr.dtype}.")
        arr = arr.astype(np.int64)
    return arr


def _check_same_length(a: Any, b: Any, name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same length, got {len(a)} and {len(b)}."
        )


def _score_matrix(scores: Any, references: np.ndarray, from_logits: bool) -> np.ndarray:
    """Validate an (N, C) matrix of class probabilities (or logits) against its labels.

    Probabilities must be non-negative rows that sum to 1 (within 1e-3): unnormalised scores
    passed without ``from_logits=True`` are refused rather than silently misread.
    """
    arr = _to_numpy(scores, "probabilities", dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(
            f"`probabilities` must be 2-D (examples x classes), got shape {arr.shape}."
        )
    _check_same_length(arr, references, "probabilities", "references")
    if not np.all(np.isfinite(arr)):
        raise ValueError("`probabilities` contains NaN or infinite values.")
    if references.min() < 0 or references.max() >= arr.shape[1]:
        raise ValueError(
            f"`references` must lie in [0, {arr.shape[1] - 1}] (number of classes), "
            f"got range [{references.min()}, {references.max()}]."
        )
    if not from_logits and (arr.min() < 0 or not np.allclose(arr.sum(axis=1), 1.0, atol=1e-3)):
        raise ValueError(
            "`probabilities` rows must be non-negative and sum to 1; pass `from_logits=True` "
            "for unnormalised scores."
        )
    return arr


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------


def accuracy(predictions: Any, references: Any) -> float:
    """Fraction of examples whose predicted label equals the reference label."""
    preds = _labels(predictions, "predictions")
    refs = _labels(references, "references")
    _check_same_length(preds, refs, "predictions", "references")
    return float(np.mean(preds == refs))


def negative_log_likelihood(
    probabilities: Any, references: Any, eps: float = 1e-12, from_logits: bool = False
) -> float:
    """Mean negative log-likelihood ``-1/N sum_n log p_n[y_n]`` of the reference labels.

    Args:
        probabilities: (N, C) class probabilities, or logits when ``from_logits=True``.
        references: (N,) integer labels.
        eps: probabilities are clipped below at ``eps`` (ignored for logits, whose
            log-softmax is exact).
        from_logits: treat ``probabilities`` as logits and use a stable log-softmax.
    """
    refs = _labels(references, "references")
    scores = _score_matrix(probabilities, refs, from_logits)
    # log-softmax is exact for logits; probabilities are clipped so that p = 0 stays finite.
    log_p = log_softmax(scores, axis=1) if from_logits else np.log(np.clip(scores, eps, None))
    return float(-np.mean(log_p[np.arange(refs.size), refs]))


@dataclass(frozen=True)
class CalibrationBins:
    """Per-bin data of a reliability diagram (Guo et al., 2017, Sec. 2).

    Attributes:
        edges: (n_bins + 1,) bin edges ``np.linspace(0, 1, n_bins + 1)``; bin ``b`` is
            ``(edges[b], edges[b + 1]]`` and confidence 0 belongs to bin 0.
        accuracy: (n_bins,) accuracy of the examples in each bin; NaN for an empty bin.
        confidence: (n_bins,) mean max-probability in each bin; NaN for an empty bin.
        counts: (n_bins,) number of examples in each bin.
    """

    edges: np.ndarray
    accuracy: np.ndarray
    confidence: np.ndarray
    counts: np.ndarray

    @property
    def weights(self) -> np.ndarray:
        """Fraction of all examples that falls in each bin, ``|B_b| / N``."""
        return self.counts / self.counts.sum()


def calibration_bins(
    probabilities: Any, references: Any, n_bins: int = 15, from_logits: bool = False
) -> CalibrationBins:
    """Group examples into equal-width bins of confidence (max probability).

    The prediction of an example is ``argmax`` of its row (ties go to the lower class index)
    and its confidence is the row's maximum probability.

    Args:
        probabilities: (N, C) class probabilities, or logits when ``from_logits=True``.
        references: (N,) integer labels.
        n_bins: number of equal-width bins on [0, 1] (Guo et al. use 15).
        from_logits: apply a softmax to ``probabilities`` first.
    """
    check_integer("n_bins", n_bins, low=1)
    refs = _labels(references, "references")
    probs = _score_matrix(probabilities, refs, from_logits)
    if from_logits:
        probs = softmax(probs, axis=1)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == refs

    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" on the interior edges puts a value equal to an edge into the bin below it:
    # bins are (lo, hi]; 0 lands in bin 0 and 1 in the last bin.
    bin_ids = np.searchsorted(edges[1:-1], confidence, side="left")
    counts = np.bincount(bin_ids, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_acc = np.bincount(bin_ids, weights=correct, minlength=n_bins) / counts
        bin_conf = np.bincount(bin_ids, weights=confidence, minlength=n_bins) / counts
    return CalibrationBins(edges=edges, accuracy=bin_acc, confidence=bin_conf, counts=counts)


def expected_calibration_error(
    probabilities: Any, references: Any, n_bins: int = 15, from_logits: bool = False
) -> float:
    """Expected calibration error, ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|``.

    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017, Eq. (3), with the
    equal-width bins of :func:`calibration_bins` (empty bins contribute nothing).
    """
    bins = calibration_bins(probabilities, references, n_bins=n_bins, from_logits=from_logits)
    filled = bins.counts > 0
    gaps = np.abs(bins.accuracy[filled] - bins.confidence[filled])
    return float(np.sum(bins.weights[filled] * gaps))


# --------------------------------------------------------------------------------------------
# continual learning
# --------------------------------------------------------------------------------------------


def _accuracy_matrix(acc: Any) -> np.ndarray:
    """Validate a (T, T) accuracy matrix whose lower triangle (with diagonal) is finite."""
    arr = _to_numpy(acc, "acc", dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(
            f"`acc` must be a non-empty square (T, T) matrix with acc[i, j] = accuracy on task j "
            f"after training task i, got shape {arr.shape}."
        )
    lower = np.tril_indices(arr.shape[0])
    if not np.all(np.isfinite(arr[lower])):
        raise ValueError("`acc` must be finite on and below the diagonal (j <= i).")
    return arr


def final_average_accuracy(acc: Any) -> float:
    """Mean accuracy over all tasks after the last one, ``1/T sum_j acc[T-1, j]``."""
    arr = _accuracy_matrix(acc)
    return float(np.mean(arr[-1]))


def average_forgetting(acc: Any) -> float:
    """Average forgetting after the last task (Chaudhry et al., ECCV 2018, Eq. 5-6).

    ``f_j = max_{j <= l <= T-2} acc[l, j] - acc[T-1, j]`` for every task ``j < T-1``, averaged
    over those ``T-1`` tasks. With a single task nothing can have been forgotten: 0.0.
    """
    arr = _accuracy_matrix(acc)
    num_tasks = arr.shape[0]
    if num_tasks == 1:
        return 0.0
    past = np.where(np.tril(np.ones_like(arr, dtype=bool)), arr, -np.inf)[:-1, :-1]
    return float(np.mean(past.max(axis=0) - arr[-1, :-1]))


def average_incremental_accuracy(acc: Any) -> float:
    """Mean over stages of the average accuracy on the tasks seen so far (Rebuffi et al., 2017).

    ``1/T sum_i (1/(i+1) sum_{j<=i} acc[i, j])``.
    """
    arr = _accuracy_matrix(acc)
    rows = [np.mean(arr[i, : i + 1]) for i in range(arr.shape[0])]
    return float(np.mean(rows))


def accuracy_matrix(
    predictions: Any,
    references: Any,
    stage_ids: Any,
    task_ids: Any,
    num_tasks: int | None = None,
) -> np.ndarray:
    """Build ``acc[i, j]`` from per-example evaluations.

    Example ``n`` was predicted after training task ``stage_ids[n]`` and belongs to task
    ``task_ids[n]``. Cells above the diagonal (evaluations of tasks not trained yet) are NaN;
    every cell on or below the diagonal must have at least one example.

    Args:
        num_tasks: T; inferred as ``max(stage_ids, task_ids) + 1`` when not given.
    """
    preds = _labels(predictions, "predictions")
    refs = _labels(references, "references")
    stages = _labels(stage_ids, "stage_ids")
    tasks = _labels(task_ids, "task_ids")
    for other, name in ((refs, "references"), (stages, "stage_ids"), (tasks, "task_ids")):
        _check_same_length(preds, other, "predictions", name)
    if min(stages.min(), tasks.min()) < 0:
        raise ValueError("`stage_ids` and `task_ids` must be >= 0.")
    inferred = int(max(stages.max(), tasks.max())) + 1
    if num_tasks is None:
        num_tasks = inferred
    else:
        num_tasks = check_integer("num_tasks", num_tasks, low=1)
        if num_tasks < inferred:
            refuse("num_tasks", f"at least {inferred} (the ids go up to {inferred - 1})", num_tasks)
    cells = stages * num_tasks + tasks
    size = num_tasks * num_tasks
    counts = np.bincount(cells, minlength=size).reshape(num_tasks, num_tasks)
    hits = np.bincount(cells, weights=preds == refs, minlength=size).reshape(counts.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = hits / counts
    missing = np.argwhere(np.tril(counts == 0))
    if missing.size:
        raise ValueError(
            f"no examples for (stage_id, task_id) cells {[tuple(map(int, c)) for c in missing]}: "
            "every task j <= i must be evaluated after each training stage i."
        )
    acc[np.triu_indices(num_tasks, k=1)] = np.nan
    return acc


# --------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------


def _check_k(k: Any) -> int:
    return check_integer("k", k, low=1)


def _relevant_set(relevant: Any) -> set:
    """One id (str, int, ...) or a collection of ids, as a set of hashable ids."""
    if hasattr(relevant, "tolist"):  # numpy / torch
        relevant = relevant.tolist()
    if isinstance(relevant, (str, bytes)) or not isinstance(relevant, Iterable):
        return {relevant}
    return set(relevant)


def _first_relevant_ranks(ranked_ids: Any, relevant_ids: Any) -> np.ndarray:
    """1-based rank of the first relevant id in each query's ranking; ``inf`` when absent."""
    if hasattr(ranked_ids, "tolist"):
        ranked_ids = ranked_ids.tolist()
    if hasattr(relevant_ids, "tolist"):
        relevant_ids = relevant_ids.tolist()
    if isinstance(ranked_ids, (str, bytes)) or isinstance(relevant_ids, (str, bytes)):
        raise ValueError("`ranked_ids` and `relevant_ids` must hold one entry per query.")
    ranked_ids, relevant_ids = list(ranked_ids), list(relevant_ids)
    if not ranked_ids:
        raise ValueError("`ranked_ids` is empty: at least one query is needed.")
    _check_same_length(ranked_ids, relevant_ids, "ranked_ids", "relevant_ids")
    ranks = np.full(len(ranked_ids), np.inf)
    for q, (ranking, relevant) in enumerate(zip(ranked_ids, relevant_ids)):
        if isinstance(ranking, (str, bytes)) or not isinstance(ranking, Iterable):
            raise ValueError(f"`ranked_ids[{q}]` must be a sequence of ids, got {ranking!r}.")
        wanted = _relevant_set(relevant)
        for position, doc_id in enumerate(ranking, start=1):
            if doc_id in wanted:
                ranks[q] = position
                break
    return ranks


def hits_at_k(ranked_ids: Any, relevant_ids: Any, k: int) -> float:
    """Fraction of queries with at least one relevant id among their first ``k`` ranked ids.

    Args:
        ranked_ids: per query, the candidate ids best first (a list of lists, possibly of
            different lengths, or a (Q, D) array such as :func:`rank_from_scores` returns).
        relevant_ids: per query, one relevant id or a collection of relevant ids.
        k: cut-off, >= 1.
    """
    k = _check_k(k)
    return float(np.mean(_first_relevant_ranks(ranked_ids, relevant_ids) <= k))


def mrr_at_k(ranked_ids: Any, relevant_ids: Any, k: int) -> float:
    """Mean reciprocal rank of the first relevant id, counted as 0 beyond rank ``k``.

    Arguments as in :func:`hits_at_k`. Always ``mrr_at_k <= hits_at_k`` for the same ``k``.
    """
    k = _check_k(k)
    ranks = _first_relevant_ranks(ranked_ids, relevant_ids)
    return float(np.mean(np.where(ranks <= k, 1.0 / ranks, 0.0)))


def rank_from_scores(scores: Any, k: int) -> np.ndarray:
    """Indices of the ``min(k, D)`` highest scores per row of a (Q, D) score matrix.

    Ties are broken by the lower column index (a stable sort), so the result is deterministic.
    """
    k = _check_k(k)
    arr = _to_numpy(scores, "scores", dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"`scores` must be 2-D (queries x documents), got shape {arr.shape}.")
    if np.isnan(arr).any():
        raise ValueError("`scores` contains NaN.")
    return np.argsort(-arr, axis=1, kind="stable")[:, :k]

"""Metrics: hand-computed values, edge cases, invariants, independent references, evaluate modules."""

import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, log_loss

from hf_extensions import metrics
from hf_extensions.metrics import functional as F

NAN = float("nan")

# --------------------------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------------------------


def test_accuracy_hand_computed_and_input_types():
    # 3 of 4 equal -> 0.75
    assert F.accuracy([0, 1, 2, 2], [0, 1, 2, 0]) == 0.75
    assert F.accuracy(np.array([1, 1]), torch.tensor([1, 1])) == 1.0
    assert F.accuracy(torch.tensor([0.0, 1.0]), [1, 1]) == 0.5  # integral floats accepted


def test_accuracy_matches_sklearn():
    rng = np.random.default_rng(0)
    preds, refs = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    assert F.accuracy(preds, refs) == pytest.approx(accuracy_score(refs, preds))


@pytest.mark.parametrize(
    ("preds", "refs", "match"),
    [
        ([0, 1], [0], "same length"),
        ([[0, 1]], [[0, 1]], "predictions"),
        ([], [], "empty"),
        ([0.5, 1.0], [0, 1], "integer labels"),
    ],
)
def test_accuracy_rejects_bad_input(preds, refs, match):
    with pytest.raises(ValueError, match=match):
        F.accuracy(preds, refs)


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------

# 4 samples, 5 bins with edges 0, .2, .4, .6, .8, 1 (bins are (lo, hi]):
#   s0 [0.9, 0.1]   y=0 -> conf .90, correct -> bin 4
#   s1 [0.3, 0.7]   y=0 -> conf .70, wrong   -> bin 3
#   s2 [0.65, 0.35] y=0 -> conf .65, correct -> bin 3
#   s3 [0.5, 0.5]   y=1 -> tie -> class 0, conf .50, wrong -> bin 2
# bin 2: n=1 acc 0   conf .5   gap .5   weight 1/4 -> .125
# bin 3: n=2 acc .5  conf .675 gap .175 weight 1/2 -> .0875
# bin 4: n=1 acc 1   conf .9   gap .1   weight 1/4 -> .025
# ECE = .2375
ECE_PROBS = [[0.9, 0.1], [0.3, 0.7], [0.65, 0.35], [0.5, 0.5]]
ECE_REFS = [0, 0, 0, 1]


def test_ece_hand_computed():
    assert F.expected_calibration_error(ECE_PROBS, ECE_REFS, n_bins=5) == pytest.approx(0.2375)
    bins = F.calibration_bins(ECE_PROBS, ECE_REFS, n_bins=5)
    np.testing.assert_allclose(bins.edges, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_array_equal(bins.counts, [0, 0, 1, 2, 1])
    np.testing.assert_allclose(bins.accuracy, [NAN, NAN, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(bins.confidence, [NAN, NAN, 0.5, 0.675, 0.9])
    np.testing.assert_allclose(bins.weights, [0, 0, 0.25, 0.5, 0.25])


def test_ece_from_logits_equals_ece_of_softmax():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0], [1.0, 1.0, 1.0]])
    refs = [0, 2, 1]
    probs = torch.softmax(logits, dim=1)
    assert F.expected_calibration_error(logits, refs, from_logits=True) == pytest.approx(
        F.expected_calibration_error(probs, refs)
    )


def test_ece_bin_boundaries_are_left_open():
    # n_bins=4: exact edges 0, .25, .5, .75, 1. Confidence .5 lies in (.25, .5] = bin 1,
    # confidence 1.0 in the top bin, uniform over 4 classes (conf .25) in (0, .25] = bin 0.
    probs = [[0.5, 0.5, 0, 0], [1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]]
    bins = F.calibration_bins(probs, [0, 0, 0], n_bins=4)
    np.testing.assert_array_equal(bins.counts, [1, 1, 0, 1])


def test_ece_perfect_calibration_is_zero():
    # 10 samples at confidence .8 with 8 correct, 5 at confidence 1.0 all correct.
    probs = [[0.8, 0.2]] * 10 + [[0.0, 1.0]] * 5
    refs = [0] * 8 + [1] * 2 + [1] * 5
    assert F.expected_calibration_error(probs, refs) == pytest.approx(0.0, abs=1e-12)


def test_ece_uniform_probabilities():
    # Uniform over 4 classes: always predicts class 0 with confidence .25.
    uniform = np.full((4, 4), 0.25)
    assert F.expected_calibration_error(uniform, [0, 1, 2, 3]) == pytest.approx(0.0)  # acc .25
    assert F.expected_calibration_error(uniform, [0, 0, 0, 0]) == pytest.approx(0.75)  # acc 1


def test_ece_matches_sklearn_calibration_curve():
    # Independent computation: sklearn's reliability curve on (correct, confidence) pairs,
    # weighted by numpy's histogram counts (random confidences never sit on an edge).
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(500, 6)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    refs = rng.integers(0, 6, 500)
    conf, correct = probs.max(1), probs.argmax(1) == refs
    acc_b, conf_b = calibration_curve(correct, conf, n_bins=10, strategy="uniform")
    counts = np.histogram(conf, bins=np.linspace(0, 1, 11))[0]
    expected = np.sum(counts[counts > 0] / 500 * np.abs(acc_b - conf_b))
    assert F.expected_calibration_error(probs, refs, n_bins=10) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("probs", "refs", "kwargs", "match"),
    [
        ([0.5, 0.5], [0, 1], {}, "2-D"),
        ([[0.5, 0.5]], [0, 1], {}, "same length"),
        ([[2.0, -1.0]], [0], {}, "from_logits"),
        ([[0.5, 0.5]], [2], {}, "references"),
        ([[0.5, 0.5]], [0], {"n_bins": 0}, "n_bins"),
        ([[NAN, 0.5]], [0], {}, "NaN"),
    ],
)
def test_ece_rejects_bad_input(probs, refs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.expected_calibration_error(probs, refs, **kwargs)


# --------------------------------------------------------------------------------------------
# negative log-likelihood
# --------------------------------------------------------------------------------------------


def test_nll_hand_computed():
    # -(log .5 + log .75) / 2
    expected = -(math.log(0.5) + math.log(0.75)) / 2
    assert F.negative_log_likelihood([[0.5, 0.5], [0.25, 0.75]], [0, 1]) == pytest.approx(expected)
    # p[y] = 0 is clipped at eps: -log(1e-12)
    assert F.negative_log_likelihood([[1.0, 0.0]], [1]) == pytest.approx(12 * math.log(10))


def test_nll_matches_sklearn_and_torch():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(100, 5)) * 3
    refs = rng.integers(0, 5, 100)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ref_value = log_loss(refs, probs, labels=range(5))
    assert F.negative_log_likelihood(probs, refs) == pytest.approx(ref_value)
    torch_value = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(refs))
    nll_logits = F.negative_log_likelihood(torch.tensor(logits), refs, from_logits=True)
    assert nll_logits == pytest.approx(torch_value.item())


def test_nll_from_logits_is_stable():
    # log-softmax of [1000, 0] at class 1 is exactly -1000: no overflow, no clipping.
    assert F.negative_log_likelihood([[1000.0, 0.0]], [1], from_logits=True) == pytest.approx(1000)


# --------------------------------------------------------------------------------------------
# continual learning
# --------------------------------------------------------------------------------------------

# acc[i, j] = accuracy on task j after training task i (upper triangle ignored)
ACC = [
    [0.90, NAN, NAN],
    [0.95, 0.80, NAN],
    [0.60, 0.50, 0.95],
]
# final average accuracy      = (.60 + .50 + .95) / 3                 = 0.683333
# forgetting task 0           = max(.90, .95) - .60 = .35
# forgetting task 1           = .80 - .50           = .30  -> average .325
# average incremental accuracy = (.90 + (.95 + .80)/2 + 2.05/3) / 3    = 0.819444


def test_continual_metrics_hand_computed():
    assert F.final_average_accuracy(ACC) == pytest.approx(2.05 / 3)
    assert F.average_forgetting(ACC) == pytest.approx(0.325)
    assert F.average_incremental_accuracy(ACC) == pytest.approx((0.90 + 0.875 + 2.05 / 3) / 3)


def test_continual_upper_triangle_is_ignored():
    filled = np.array(ACC)
    filled[np.triu_indices(3, k=1)] = [7.0, -3.0, 99.0]
    for fn in (F.final_average_accuracy, F.average_forgetting, F.average_incremental_accuracy):
        assert fn(filled) == pytest.approx(fn(ACC))


def test_continual_single_task_and_backward_transfer():
    assert F.average_forgetting([[0.7]]) == 0.0
    assert F.final_average_accuracy([[0.7]]) == pytest.approx(0.7)
    assert F.average_incremental_accuracy([[0.7]]) == pytest.approx(0.7)
    # accuracy on task 0 rises from .5 to .7: forgetting is negative (backward transfer)
    assert F.average_forgetting([[0.5, NAN], [0.7, 0.9]]) == pytest.approx(-0.2)


@pytest.mark.parametrize(
    ("acc", "match"),
    [([0.5, 0.6], "square"), (np.zeros((2, 3)), "square"), ([[NAN, 0], [0, 1]], "finite")],
)
def test_continual_rejects_bad_matrix(acc, match):
    with pytest.raises(ValueError, match=match):
        F.average_forgetting(acc)


# Per-example evaluations that give acc = [[.5, -], [1, 0]]:
#   after stage 0, task 0: 2 examples, 1 correct; after stage 1, task 0: 1 of 1; task 1: 0 of 2.
#   A task-1 example evaluated after stage 0 (not trained yet) is ignored.
CL_EXAMPLES = {
    "predictions": [1, 0, 3, 1, 2, 2],
    "references": [1, 1, 3, 1, 0, 0],
    "stage_ids": [0, 0, 0, 1, 1, 1],
    "task_ids": [0, 0, 1, 0, 1, 1],
}


def test_accuracy_matrix_from_examples():
    acc = F.accuracy_matrix(**CL_EXAMPLES)
    np.testing.assert_allclose(acc, [[0.5, NAN], [1.0, 0.0]])
    with pytest.raises(ValueError, match=r"\(2, 0\)"):  # stage 2 of 3 never evaluated
        F.accuracy_matrix(**CL_EXAMPLES, num_tasks=3)
    with pytest.raises(ValueError, match=r"\(1, 1\)"):
        F.accuracy_matrix([0], [0], stage_ids=[1], task_ids=[0])
    with pytest.raises(ValueError, match="num_tasks"):
        F.accuracy_matrix(**CL_EXAMPLES, num_tasks=1)


# --------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------

RANKED = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"], ["j", "k"]]
RELEVANT = ["a", ["f", "x"], "z", {"k"}]
# first relevant ranks: 1, 3, absent, 2 (a shorter ranking is allowed)
EXPECTED_RETRIEVAL = {
    1: (1 / 4, 1 / 4),
    2: (2 / 4, (1 + 1 / 2) / 4),
    3: (3 / 4, (1 + 1 / 3 + 1 / 2) / 4),
    10: (3 / 4, (1 + 1 / 3 + 1 / 2) / 4),
}


@pytest.mark.parametrize("k", sorted(EXPECTED_RETRIEVAL))
def test_retrieval_hand_computed(k):
    hits, mrr = EXPECTED_RETRIEVAL[k]
    assert F.hits_at_k(RANKED, RELEVANT, k) == pytest.approx(hits)
    assert F.mrr_at_k(RANKED, RELEVANT, k) == pytest.approx(mrr)


def test_retrieval_absent_relevant_scores_zero():
    assert F.mrr_at_k([[1, 2, 3]], [9], k=3) == 0.0
    assert F.hits_at_k([[1, 2, 3]], [[]], k=3) == 0.0


def test_rank_from_scores_ties_and_array_input():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.9], [0.0, 0.0, 0.0, 1.0]])
    top = F.rank_from_scores(scores, k=3)
    np.testing.assert_array_equal(top, [[1, 3, 0], [3, 0, 1]])  # ties -> lower index first
    assert F.rank_from_scores(scores, k=10).shape == (2, 4)  # k > D keeps all D
    # a 2-D array of ranked indices works directly; relevant doc 3 for query 0 is at rank 2
    assert F.mrr_at_k(top, np.array([3, 2]), k=3) == pytest.approx((1 / 2 + 0) / 2)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: F.hits_at_k([[1]], [1], k=0), "`k`"),
        (lambda: F.mrr_at_k([[1], [2]], [1], k=1), "same length"),
        (lambda: F.hits_at_k([], [], k=1), "empty"),
        (lambda: F.hits_at_k(["ab"], ["a"], k=1), r"ranked_ids\[0\]"),
        (lambda: F.rank_from_scores([1.0, 2.0], k=1), "2-D"),
        (lambda: F.rank_from_scores([[1.0, NAN]], k=1), "NaN"),
    ],
)
def test_retrieval_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------------------------
# invariants
# --------------------------------------------------------------------------------------------

_logits = arrays(
    np.float64,
    st.tuples(st.integers(1, 20), st.integers(1, 6)),
    elements=st.floats(-30, 30, allow_nan=False),
)


@settings(max_examples=60, deadline=None)
@given(logits=_logits, seed=st.integers(0, 2**16), n_bins=st.integers(1, 20))
def test_ece_in_unit_interval_and_nll_non_negative(logits, seed, n_bins):
    refs = np.random.default_rng(seed).integers(0, logits.shape[1], logits.shape[0])
    ece = F.expected_calibration_error(logits, refs, n_bins=n_bins, from_logits=True)
    assert 0.0 <= ece <= 1.0 + 1e-12
    assert F.negative_log_likelihood(logits, refs, from_logits=True) >= 0.0
    bins = F.calibration_bins(logits, refs, n_bins=n_bins, from_logits=True)
    assert bins.counts.sum() == logits.shape[0]


@settings(max_examples=60, deadline=None)
@given(
    rankings=st.lists(st.lists(st.integers(0, 9), max_size=8), min_size=1, max_size=10),
    data=st.data(),
    k=st.integers(1, 10),
)
def test_mrr_at_most_hits_and_monotone_in_k(rankings, data, k):
    relevant = [data.draw(st.sets(st.integers(0, 9), max_size=3)) for _ in rankings]
    hits, mrr = F.hits_at_k(rankings, relevant, k), F.mrr_at_k(rankings, relevant, k)
    assert 0.0 <= mrr <= hits <= 1.0
    assert F.hits_at_k(rankings, relevant, k + 1) >= hits
    assert F.mrr_at_k(rankings, relevant, k + 1) >= mrr


# --------------------------------------------------------------------------------------------
# evaluate modules and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rng_data():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(64, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return logits, probs, rng.integers(0, 4, 64)


def _load_by_path(name):
    import evaluate

    return evaluate.load(str(metrics.metric_module_path(name)))


def test_evaluate_modules_match_functional(rng_data):
    logits, probs, refs = rng_data
    acc = _load_by_path("accuracy").compute(predictions=probs.argmax(1), references=refs)
    assert acc == {"accuracy": F.accuracy(probs.argmax(1), refs)}

    ece_module = _load_by_path("expected_calibration_error")
    assert ece_module.compute(predictions=probs, references=refs, n_bins=7)["ece"] == (
        pytest.approx(F.expected_calibration_error(probs, refs, n_bins=7), abs=1e-12)
    )
    assert ece_module.compute(predictions=ECE_PROBS, references=ECE_REFS, n_bins=5) == {
        "ece": pytest.approx(0.2375)
    }
    nll = _load_by_path("nll").compute(predictions=logits, references=refs, from_logits=True)
    assert nll["nll"] == pytest.approx(F.negative_log_likelihood(logits, refs, from_logits=True))

    continual = _load_by_path("continual").compute(**CL_EXAMPLES)
    acc_matrix = [[0.5, NAN], [1.0, 0.0]]
    assert continual == {
        "final_average_accuracy": pytest.approx(0.5),
        "average_forgetting": pytest.approx(F.average_forgetting(acc_matrix)),
        "average_incremental_accuracy": pytest.approx(0.5),
    }

    retrieval = _load_by_path("retrieval")
    result = retrieval.compute(
        predictions=RANKED, references=[["a"], ["f", "x"], ["z"], ["k"]], k=[1, 3]
    )
    assert result == pytest.approx(
        {f"{m}@{k}": EXPECTED_RETRIEVAL[k][m == "mrr"] for k in (1, 3) for m in ("hits", "mrr")}
    )
    single = retrieval.compute(predictions=[[1, 2], [3, 4]], references=[2, 7], k=2)
    assert single == pytest.approx({"hits@2": 0.5, "mrr@2": 0.25})


def test_evaluate_module_is_a_copy_that_uses_the_functional_core():
    module = _load_by_path("nll")
    source = sys.modules[type(module).__module__]
    # evaluate runs a copy from its modules cache, which still imports the installed package
    assert "evaluate_modules" in source.__file__
    assert source.functional.negative_log_likelihood is F.negative_log_likelihood


def test_continual_module_accumulates_stages_with_add_batch():
    module = metrics.load_metric("continual")
    for stage in (0, 1):
        rows = [i for i, s in enumerate(CL_EXAMPLES["stage_ids"]) if s == stage]
        module.add_batch(**{key: [vals[i] for i in rows] for key, vals in CL_EXAMPLES.items()})
    assert module.compute()["average_forgetting"] == pytest.approx(-0.5)  # .5 -> 1.0 on task 0


def test_load_metric_names_and_errors():
    assert metrics.load_metric("ece").name == "expected_calibration_error"
    with pytest.raises(ValueError, match=r"available: .*'ece'"):
        metrics.load_metric("bleu")


def test_compute_classification_metrics_with_eval_prediction(rng_data):
    from transformers import EvalPrediction

    logits, probs, refs = rng_data
    labels = refs.copy()
    labels[:4] = -100  # ignored, as in transformers' losses
    out = metrics.compute_classification_metrics(
        EvalPrediction(predictions=(logits, np.zeros(64)), label_ids=labels)
    )
    kept_probs, kept_refs = probs[4:], refs[4:]
    assert out == pytest.approx(
        {
            "accuracy": accuracy_score(kept_refs, kept_probs.argmax(1)),
            "nll": log_loss(kept_refs, kept_probs, labels=range(4)),
            "ece": F.expected_calibration_error(kept_probs, kept_refs),
        }
    )


def test_classification_metrics_survive_importing_the_evaluate_module_folders():
    """``pkgutil.walk_packages`` (the config fuzz registry) imports ``metrics/accuracy/`` as a
    package, which rebinds ``hf_extensions.metrics.accuracy`` to it; the Trainer's
    ``compute_metrics`` must not call the module (it did: 8 recipe tests failed after the walk)."""
    import importlib

    from hf_extensions.metrics import compute_classification_metrics

    for name in ("accuracy", "expected_calibration_error", "nll"):
        importlib.import_module(f"hf_extensions.metrics.{name}")
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    result = compute_classification_metrics((logits, np.array([0, 1, 1])))
    assert result["accuracy"] == pytest.approx(2 / 3)

"""The Agnostic-SAM evidence benchmark's tuning follows its protocol (benchmarks/agnostic_sam.py),
checked with a fake scorer instead of training runs."""

import json
import math

import pytest

from benchmarks import _agnostic_sam_runs as runs
from benchmarks import agnostic_sam


def _fake_scores(monkeypatch, best_lr, best_sam_rho, best_rho, best_variant):
    """Validation accuracy peaking at the given settings (log-distance), recording every trial."""
    trials = []

    def score(arm, regime, data, seed):
        trials.append(arm)
        assert seed == agnostic_sam.TUNING_SEED, "tuning must never use a test seed"
        value = -abs(math.log(arm.learning_rate / best_lr))
        if arm.method == "sam":
            value -= abs(math.log(arm.rho / best_sam_rho))
        if arm.method == "agnostic_sam":
            value -= abs(math.log(arm.rho / best_rho))
            value += 0.5 * ((arm.final_grad_on, arm.chain) == best_variant)
        return {"validation_accuracy": value}

    monkeypatch.setattr(runs, "train_and_score", score)
    return trials


def test_tuning_finds_each_optimum_with_the_same_budget_for_both_perturbation_arms(monkeypatch):
    trials = _fake_scores(monkeypatch, 0.03, 0.2, 0.1, ("sum", False))
    regime = runs.Regime(train_images=10, label_noise=0.0, epochs=1)
    tuned, record = agnostic_sam.tune(regime, None, log=lambda _: None)
    assert tuned.learning_rate == pytest.approx(0.03) and tuned.rho == pytest.approx(0.2)
    assert tuned.rho_agnostic == pytest.approx(0.1)
    assert (tuned.final_grad_on, tuned.chain) == ("sum", False)
    counts = {m: sum(a.method == m for a in trials) for m in ("sgd", "sam", "agnostic_sam")}
    assert counts == {"sgd": 4, "sam": 8, "agnostic_sam": 8}
    assert record["sam_rho"]["optimum_inside_grid"] and record["learning_rate"]["extensions"] == 0


def test_an_edge_optimum_extends_the_grid_and_is_reported(monkeypatch):
    _fake_scores(monkeypatch, 0.0001, 0.2, 0.1, ("full", False))
    regime = runs.Regime(train_images=10, label_noise=0.0, epochs=1)
    tuned, record = agnostic_sam.tune(regime, None, log=lambda _: None)
    assert record["learning_rate"]["extensions"] == 2
    assert not record["learning_rate"]["optimum_inside_grid"]
    assert tuned.learning_rate == pytest.approx(0.01 / 9)


def test_the_ablation_arm_differs_from_agnostic_sam_only_by_rho_val():
    tuned = agnostic_sam.Tuned(0.03, 0.2, 0.1, "train", True)
    arms = agnostic_sam.arms_of(tuned)
    assert arms["agnostic_sam_no_val"].rho_val == 0.0
    assert arms["agnostic_sam"].rho_val is None  # = rho
    ablation = dict(vars(arms["agnostic_sam_no_val"]), rho_val=None)
    assert ablation == vars(arms["agnostic_sam"])
    assert arms["sam"].rho == 0.2 and arms["sgd"].rho == 0.0


def test_a_partial_run_adds_its_regimes_to_the_earlier_report():
    def results(offset):
        return {arm: {"test_accuracy": [0.5 + offset, 0.6 + offset]} for arm in agnostic_sam.ARMS}

    regime = agnostic_sam.REGIMES["limited"]
    first = agnostic_sam.build_report({"limited": results(0.0)}, {"limited": {"lr": 1}},
                               {"limited/x": {"mean": 1}}, {"limited": regime}, {}, {}, (0, 1))  # fmt: skip
    previous = json.loads(json.dumps(first.to_dict()))
    later = agnostic_sam.build_report({"noisy": results(0.1)}, {"noisy": {"lr": 2}},
                               {"noisy/x": {"mean": 2}}, {"noisy": agnostic_sam.REGIMES["noisy"]},
                               {"r": 1.0}, {}, (0, 1), previous)  # fmt: skip
    assert later.metrics["limited/sgd"] == first.metrics["limited/sgd"]
    assert later.metrics["noisy/sgd"]["test_accuracy_mean"] == pytest.approx(0.65)
    assert set(later.config["regimes"]) == {"limited", "noisy"}
    assert later.config["tuning"] == {"limited": {"lr": 1}, "noisy": {"lr": 2}}
    assert set(later.intervals) == {"limited/x", "noisy/x"}

"""The PGA benchmark's audit pieces: honest selection on validation, and the linear-probe ceiling."""

from __future__ import annotations

import argparse

import torch

from benchmarks import pga


def test_tune_selects_on_validation_only_with_ties_to_the_earlier_candidate(monkeypatch):
    """The winner is the best *validation* accuracy (test accuracy is deliberately the reverse
    order, so selecting on it would pick another candidate); a tie keeps the earlier one; the
    options object of the caller is not mutated by the candidates."""
    validation = {0.01: 0.50, 0.1: 0.60, 1.0: 0.60, 10.0: 0.40}
    test = {0.01: 0.90, 0.1: 0.10, 1.0: 0.20, 10.0: 0.95}
    seen = []

    def fake_run(method, clip, tokenizer, train, val, tst, opts, seed):
        seen.append((method, opts.align, seed, train))
        return {
            "validation_accuracy": validation[opts.align],
            "target_accuracy": test[opts.align],
            "grad_cosine": opts.align,
            "cosine_curve": [],
        }

    class Clip:
        def load_state_dict(self, state):
            pass

    monkeypatch.setattr(pga, "run", fake_run)
    opts = argparse.Namespace(seeds=[7, 8], align=3.0)
    candidates = [{"align": a} for a in validation]
    chosen, table = pga.tune(
        "pga", candidates, lambda trial, seed: ("train", seed), Clip(), {}, None, None, None, opts
    )
    assert chosen == {"align": 0.1}
    assert [row["validation_accuracy"] for row in table] == list(validation.values())
    assert all("target_accuracy" not in row for row in table)
    assert [s[:3] for s in seen] == [("pga", a, 7) for a in validation]  # the first seed only
    assert all(s[3] == ("train", 7) for s in seen)
    assert opts.align == 3.0


def test_linear_probe_chooses_c_by_validation_and_scores_test():
    """Separable Gaussian classes: the weakly regularised probe separates them, the heavily
    regularised one does worse on validation, and the grid returns the validation winner in
    either order, with that C's test accuracy. The training classes are imbalanced, so that a
    probe whose weights are regularised to ~0 falls back on its (unpenalised) intercepts and
    predicts the majority class: its accuracy does not depend on how far a solver shrinks
    weights whose direction would still be right (scikit-learn 1.5 and 1.9 differ there)."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator) * 3

    def sample(labels):
        return centres[labels] + torch.randn(len(labels), 8, generator=generator) * 0.5, labels

    imbalanced = torch.tensor([0] * 50 + [1] * 25 + [2] * 15)
    parts = {
        "train": sample(imbalanced),
        "validation": sample(torch.arange(60) % 3),
        "test": sample(torch.arange(60) % 3),
    }
    features = {s: x for s, (x, _) in parts.items()}
    labels = {s: y for s, (_, y) in parts.items()}
    strong = pga.linear_probe(features, labels, [10.0])
    weak = pga.linear_probe(features, labels, [1e-6])
    assert strong[0] >= 0.95 and strong[1] > weak[1]
    assert pga.linear_probe(features, labels, [1e-6, 10.0]) == strong
    assert pga.linear_probe(features, labels, [10.0, 1e-6]) == strong

"""SupCon terms of the hierarchical-taxonomy method: values against per-pair loops, gradients
against finite differences and autograd, the fused pass against the separate terms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_extensions.hierarchical_cl.supcon import (
    grouped_supervised_contrastive_loss,
    hierarchical_supcon_losses,
    supervised_contrastive_loss,
)


def _reference_supcon(features, labels, temperature, gamma=None, include_self=False):
    """Loop form: mean over positive pairs (a, p) of -log softmax over b != a of Γ·sim/τ."""
    z = F.normalize(features, dim=1)
    n = len(labels)
    terms = []

    def s(a, b):
        w = 1.0 if gamma is None else float(gamma[labels[a], labels[b]])
        return w * float(z[a] @ z[b]) / temperature

    for a in range(n):
        others = [b for b in range(n) if include_self or b != a]
        log_norm = np.log(sum(np.exp(s(a, b)) for b in others))
        terms += [log_norm - s(a, p) for p in range(n) if p != a and labels[p] == labels[a]]
    return float(np.mean(terms))


def test_supcon_with_unit_gamma_is_plain_supcon_and_vectorised_gamma_equals_the_loop():
    torch.manual_seed(0)
    features = torch.randn(12, 5, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 0, 2, 3, 1])
    plain = supervised_contrastive_loss(features, labels, 0.1)
    ones = supervised_contrastive_loss(features, labels, 0.1, gamma=torch.ones(4, 4))
    assert torch.allclose(plain, ones)
    assert float(plain) == pytest.approx(_reference_supcon(features, labels, 0.1), rel=1e-10)
    gamma = torch.rand(4, 4, dtype=torch.float64)
    gamma = (gamma + gamma.T) / 2
    for include_self in (False, True):
        value = supervised_contrastive_loss(features, labels, 0.1, gamma, include_self)
        ref = _reference_supcon(features, labels, 0.1, gamma, include_self)
        assert float(value) == pytest.approx(ref, rel=1e-10)


def test_supcon_without_positives_is_zero_with_a_gradient_path():
    features = torch.randn(3, 4, requires_grad=True)
    loss = supervised_contrastive_loss(features, torch.tensor([0, 1, 2]))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(features.grad, torch.zeros(3, 4))


def test_grouped_loss_is_the_mean_of_per_group_supcon_over_all_groups():
    torch.manual_seed(1)
    features = torch.randn(10, 6, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 5])
    groups = [[0, 1], [2, 3], [4, 5]]
    value = grouped_supervised_contrastive_loss(features, labels, groups, 0.1)
    expected = 0.0
    for g in groups[:2]:
        mask = torch.isin(labels, torch.tensor(g))
        expected += float(supervised_contrastive_loss(features[mask], labels[mask], 0.1))
    # group [4, 5] has no positive pair: it contributes 0 and still counts
    assert float(value) == pytest.approx(expected / 3, rel=1e-12)


def test_gamma_weighting_pushes_close_classes_apart_harder():
    """The gradient on a negative pair grows with Γ: close classes are repelled more."""
    base = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.6], [0.7, 0.7]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])

    def push(weight: float) -> float:
        gamma = torch.tensor([[1.0, weight], [weight, 1.0]])
        features = base.detach().clone().requires_grad_(True)
        supervised_contrastive_loss(features, labels, 0.5, gamma).backward()
        return float(features.grad.norm())

    assert push(1.0) > push(0.1)


def _inputs(seed: int = 0, n: int = 14):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 4, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 6, (n,), generator=generator)
    labels[0] = 9  # a class in no group
    labels[1] = 5  # group [5] below: a member alone in its group
    labels[2:] = labels[2:].masked_fill(labels[2:] == 5, 4)
    gamma = torch.rand(10, 10, dtype=torch.float64, generator=generator)
    return features.requires_grad_(True), labels, [[0, 1, 2], [3, 4], [5]], (gamma + gamma.T) / 2


@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize("temperature", [0.3, 0.02])  # 0.02: the per-row shift (no fixed bound)
def test_analytic_backward_matches_finite_differences(include_self, temperature):
    features, labels, groups, gamma = _inputs()
    t = temperature

    def losses(f):
        return torch.stack(
            [
                supervised_contrastive_loss(f, labels, t, gamma, include_self),
                grouped_supervised_contrastive_loss(f, labels, groups, t, gamma, include_self),
                *hierarchical_supcon_losses(f, labels, groups, t, gamma, include_self),
            ]
        )

    assert torch.autograd.gradcheck(losses, (features,), eps=1e-6, atol=1e-6 * t**-2)
    reference = _reference_supcon(features, labels, t, gamma, include_self)
    assert float(losses(features)[0]) == pytest.approx(reference, rel=1e-10)


def test_fused_losses_equal_the_separate_terms_in_value_and_gradient():
    features, labels, groups, gamma = _inputs(1, n=40)
    glob, sub = hierarchical_supcon_losses(features, labels, groups, 0.1, gamma)
    (fused_grad,) = torch.autograd.grad(0.05 * glob + 0.1 * sub, features)
    separate_glob = supervised_contrastive_loss(features, labels, 0.1)
    separate_sub = grouped_supervised_contrastive_loss(features, labels, groups, 0.1, gamma)
    (separate_grad,) = torch.autograd.grad(0.05 * separate_glob + 0.1 * separate_sub, features)
    assert torch.allclose(glob, separate_glob) and torch.allclose(sub, separate_sub)
    assert torch.allclose(fused_grad, separate_grad)
    assert float(sub) != pytest.approx(
        float(grouped_supervised_contrastive_loss(features, labels, groups, 0.1)), rel=1e-3
    )  # Γ changes the grouped term: the comparison above can fail


def test_gradient_equals_autograd_through_a_masked_log_softmax():
    """The Γ-weighted term against the same loss written with autograd ops (-inf masking)."""
    features, labels, groups, gamma = _inputs(3, n=30)
    value = grouped_supervised_contrastive_loss(features, labels, groups, 0.5, gamma)
    (grad,) = torch.autograd.grad(value, features)
    group_of = {c: g for g, members in enumerate(groups) for c in members}
    sample_group = torch.tensor([group_of.get(int(y), -1 - i) for i, y in enumerate(labels)])
    eye = torch.eye(len(labels), dtype=torch.bool)
    allowed = (sample_group[:, None] == sample_group[None, :]) & ~eye
    positives = (labels[:, None] == labels[None, :]) & ~eye & (sample_group >= 0)[:, None]
    z = F.normalize(features, dim=1)
    logits = gamma[labels][:, labels] * (z @ z.T) / 0.5
    log_prob = torch.log_softmax(logits.masked_fill(~allowed, float("-inf")), dim=1)
    per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(1)
    expected = sum(
        per_anchor[sample_group == g].sum() / positives[sample_group == g].sum().clamp(min=1)
        for g in range(len(groups))
    ) / len(groups)
    (expected_grad,) = torch.autograd.grad(expected, features)
    assert float(value) == pytest.approx(float(expected), rel=1e-12)
    assert torch.allclose(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_supcon_validates_its_inputs():
    labels = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="temperature"):
        supervised_contrastive_loss(torch.randn(3, 2), labels, 0.0)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        supervised_contrastive_loss(torch.randn(3), labels)
    with pytest.raises(ValueError, match="groups"):
        grouped_supervised_contrastive_loss(torch.randn(3, 2), labels, [])
    with pytest.raises(ValueError, match="gamma"):
        supervised_contrastive_loss(torch.randn(3, 2), labels, gamma=torch.ones(1, 1))


def test_half_precision_features_are_computed_in_float32():
    features, labels, groups, gamma = _inputs(2, n=24)
    reference = hierarchical_supcon_losses(features.float(), labels, groups, 0.1, gamma.float())
    half = features.detach().bfloat16().requires_grad_(True)
    glob, sub = hierarchical_supcon_losses(half, labels, groups, 0.1, gamma)
    assert glob.dtype == torch.float32
    assert torch.allclose(torch.stack([glob, sub]), torch.stack(reference), rtol=2e-2)
    (glob + sub).backward()
    assert half.grad.dtype == torch.bfloat16 and torch.isfinite(half.grad).all()

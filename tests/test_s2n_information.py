"""Information-theoretic utilities: the exact posterior mean of Gaussian mixtures, MMSE(SNR),
and the I-MMSE relation d I / d snr = ½ mmse checked where both sides are computable."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_extensions.schedulers import (
    GaussianMixture,
    excess_mse,
    gaussian_mmse,
    i_mmse_mutual_information,
    mmse,
    mmse_of_denoiser,
    mutual_information,
)

BIMODAL = GaussianMixture(weights=[0.3, 0.7], means=[[-1.0], [1.0]], stds=[0.25, 0.25])


def eight_gaussians() -> GaussianMixture:
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    means = torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(torch.ones(8), means, torch.full((8,), 0.1))


def test_posterior_mean_is_exact_against_numerical_integration():
    x = torch.linspace(-4, 4, 200001, dtype=torch.float64)
    prior = BIMODAL.log_prob(x.unsqueeze(1)).exp()
    z = torch.tensor([-1.3, -0.2, 0.0, 0.4, 2.5], dtype=torch.float64)
    for alpha, sigma in [(0.9, 0.3), (0.5, 0.8), (0.1, 1.0)]:
        likelihood = torch.exp(-0.5 * ((z[:, None] - alpha * x[None]) / sigma) ** 2)
        weights = prior[None] * likelihood
        expected = (weights * x).sum(1) / weights.sum(1)
        actual = BIMODAL.posterior_mean(z.unsqueeze(1), alpha, sigma).squeeze(1)
        torch.testing.assert_close(actual, expected, atol=1e-8, rtol=0)


def test_posterior_mean_in_two_dimensions_against_self_normalised_sampling():
    data = eight_gaussians()
    x = data.sample(400_000, generator=torch.Generator().manual_seed(0))
    z = torch.tensor([[0.3, -0.2], [1.0, 1.0], [-0.5, 0.1]], dtype=torch.float64)
    alpha, sigma = 0.8, 0.6
    log_w = -0.5 * ((z[:, None, :] - alpha * x[None]) ** 2).sum(-1) / sigma**2
    weights = torch.softmax(log_w, dim=1)
    expected = weights @ x
    torch.testing.assert_close(data.posterior_mean(z, alpha, sigma), expected, atol=5e-3, rtol=0)


def test_a_single_gaussian_has_the_closed_forms():
    """x ~ N(m, s² I): mmse = d s²/(1 + snr s²) and I = d/2 log(1 + snr s²)."""
    snr = np.array([0.0, 0.3, 2.0, 40.0])
    one_d = GaussianMixture([1.0], [[0.4]], [0.7])
    torch.testing.assert_close(mmse(one_d, snr), gaussian_mmse(snr, [0.49]), atol=1e-8, rtol=0)
    expected_mi = 0.5 * np.log1p(snr * 0.49)
    torch.testing.assert_close(
        mutual_information(one_d, snr), torch.from_numpy(expected_mi), atol=1e-8, rtol=0
    )
    two_d = GaussianMixture([1.0], [[0.4, -1.0]], [0.7])
    generator = torch.Generator().manual_seed(0)
    mc = mmse(two_d, snr, n=40_000, generator=generator)
    torch.testing.assert_close(mc, gaussian_mmse(snr, [0.49, 0.49]), atol=0.02, rtol=0.02)


def test_mmse_starts_at_the_variance_decreases_and_stays_under_the_gaussian_bound():
    snr = np.concatenate([[0.0], np.geomspace(1e-2, 1e3, 40)])
    values = mmse(BIMODAL, snr)
    variance = float(BIMODAL.covariance()[0, 0])
    assert math.isclose(float(values[0]), variance, rel_tol=1e-9)
    assert bool((values[1:] < values[:-1]).all())
    bound = gaussian_mmse(snr, [variance])
    assert bool((values <= bound + 1e-9).all())
    assert float((bound - values).max()) > 0.05  # a bimodal law is easier to denoise
    # Quadrature against Monte Carlo with the exact posterior mean.
    for gamma in (0.5, 5.0):
        direct = mmse_of_denoiser(
            BIMODAL, BIMODAL.posterior_mean, gamma, n=50_000, generator=torch.Generator()
        )
        assert math.isclose(direct, float(mmse(BIMODAL, [gamma])[0]), rel_tol=0.03)


def test_i_mmse_relation_in_one_dimension():
    """I from the entropy of y against ½ ∫ mmse: two deterministic quadratures."""
    snr = np.concatenate([[0.0], np.geomspace(1e-4, 50.0, 80)])
    direct = mutual_information(BIMODAL, snr)
    integral = i_mmse_mutual_information(snr, mmse(BIMODAL, snr))
    assert float(direct[-1]) > 1.0  # far from trivial
    torch.testing.assert_close(integral, direct, atol=2e-4, rtol=0)
    # The derivative form at a few points: dI/dsnr = ½ mmse.
    for gamma in (0.2, 2.0, 20.0):
        delta = 1e-3 * gamma
        slope = (
            mutual_information(BIMODAL, [gamma + delta])
            - mutual_information(BIMODAL, [gamma - delta])
        ) / (2 * delta)
        assert math.isclose(float(slope[0]), 0.5 * float(mmse(BIMODAL, [gamma])[0]), rel_tol=1e-4)


def test_i_mmse_relation_in_two_dimensions():
    data = eight_gaussians()
    snr = np.concatenate([[0.0], np.geomspace(1e-3, 20.0, 30)])
    generator = torch.Generator().manual_seed(0)
    integral = i_mmse_mutual_information(snr, mmse(data, snr, n=3000, generator=generator))
    direct = mutual_information(data, [20.0], n=20_000, generator=generator)
    assert float(direct[0]) > 1.5
    assert abs(float(integral[-1]) - float(direct[0])) < 0.05


def test_excess_mse_of_a_biased_denoiser():
    def biased(z, alpha, sigma):  # the x̂0 of an ε-prediction 10 % too large
        x0 = BIMODAL.posterior_mean(z, alpha, sigma)
        return (z - 1.1 * (z - alpha * x0)) / alpha

    generator = torch.Generator().manual_seed(0)
    assert excess_mse(BIMODAL, BIMODAL.posterior_mean, 1.0, generator=generator) == 0.0
    for gamma in (0.05, 1.0):
        excess = excess_mse(BIMODAL, biased, gamma, n=50_000, generator=generator)
        total = mmse_of_denoiser(BIMODAL, biased, gamma, n=50_000, generator=generator)
        assert excess > 0
        assert math.isclose(total, float(mmse(BIMODAL, [gamma])[0]) + excess, rel_tol=0.03)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([0.5, -0.5], [[0.0], [1.0]], [1.0, 1.0])
    with pytest.raises(ValueError, match="stds"):
        GaussianMixture([0.5, 0.5], [[0.0], [1.0]], [1.0, 0.0])
    with pytest.raises(ValueError, match="means"):
        GaussianMixture([0.5, 0.5], [[0.0]], [1.0, 1.0])
    with pytest.raises(ValueError, match="snr"):
        mmse(BIMODAL, [-1.0])
    with pytest.raises(ValueError, match="snr_grid"):
        i_mmse_mutual_information([0.5, 1.0, 2.0], [0.1, 0.2, 0.3])

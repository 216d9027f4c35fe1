"""RBF particle kernel: closed-form gradient vs autograd, median heuristic, edge cases, scopes."""

import math

import numpy as np
import pytest
import torch

from hf_extensions.fhbi.kernels import (
    MIN_BANDWIDTH2,
    kernel_matrices,
    mean_pairwise_distance,
    median_bandwidth2,
    rbf_kernel,
    rbf_kernel_gradient,
    squared_distances,
    svgd_gradients,
)


def _particles(m=5, shape=(3, 4), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(m, *shape, generator=generator, dtype=torch.float64)


def test_closed_form_kernel_gradient_equals_autograd():
    x = _particles()
    sigma = 1.7
    kernel, sigma2 = rbf_kernel(squared_distances(x), sigma)
    closed = rbf_kernel_gradient(x, kernel, sigma2)
    m = x.shape[0]
    for i in range(m):
        # r_i = sum_j d/dx_j K(x_j, x_i), with x_i held fixed.
        xs = x.clone().requires_grad_(True)
        anchor = x[i].detach()
        total = sum(torch.exp(-((xs[j] - anchor) ** 2).sum() / (2 * sigma**2)) for j in range(m))
        (grad,) = torch.autograd.grad(total, xs)
        # The j = i term has zero gradient; the closed form must equal the sum over j.
        torch.testing.assert_close(closed[i], grad.sum(0))


def test_median_heuristic_matches_numpy():
    x = _particles(m=6)
    flat = x.reshape(6, -1).numpy()
    d2 = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    expected = np.median(d2[np.triu_indices(6, 1)]) / (2 * math.log(7))
    assert float(median_bandwidth2(squared_distances(x))) == pytest.approx(expected, rel=1e-12)
    kernel, _ = rbf_kernel(squared_distances(x), None)
    np.testing.assert_allclose(kernel.numpy(), np.exp(-d2 / (2 * expected)), rtol=1e-12)


def test_no_nan_at_zero_distance_or_zero_bandwidth():
    same = torch.ones(3, 3, 4)  # 3 identical particles
    for bandwidth in (None, 0.0, 1.0):
        kernel, sigma2 = rbf_kernel(squared_distances(same), bandwidth)
        if bandwidth != 1.0:
            assert float(sigma2) == pytest.approx(MIN_BANDWIDTH2)
        assert torch.equal(kernel, torch.ones(3, 3))
        assert torch.equal(rbf_kernel_gradient(same, kernel, sigma2), torch.zeros_like(same))
    one = torch.randn(1, 5)
    (out,) = svgd_gradients([one], [torch.ones(1, 5)], bandwidth=None)
    assert torch.equal(out, torch.ones(1, 5))  # m = 1: K = [[1]], no repulsion
    distinct = torch.tensor([[0.0], [0.0], [0.0], [0.0], [1.0]])  # median d² 0: clamped
    kernel, sigma2 = rbf_kernel(squared_distances(distinct), None)
    grads = svgd_gradients([distinct], [torch.zeros_like(distinct)])
    assert torch.isfinite(grads[0]).all() and torch.isfinite(kernel).all()
    assert kernel[0, 4] == 0 and kernel[0, 1] == 1 and torch.equal(grads[0], torch.zeros(5, 1))


def test_global_scope_equals_block_kernel_of_the_concatenation():
    a, b = _particles(4, (3,), seed=1), _particles(4, (2, 2), seed=2)
    ga, gb = _particles(4, (3,), seed=3), _particles(4, (2, 2), seed=4)
    whole = torch.cat([a, b.reshape(4, -1)], 1)
    (expected,) = svgd_gradients([whole], [torch.cat([ga, gb.reshape(4, -1)], 1)], scope="block")
    out = svgd_gradients([a, b], [ga, gb], scope="global")
    torch.testing.assert_close(torch.cat([out[0], out[1].reshape(4, -1)], 1), expected)
    block = svgd_gradients([a, b], [ga, gb], scope="block")
    assert not torch.allclose(block[0], out[0])  # the scopes really differ
    (k_a, _), (k_b, _) = kernel_matrices([a, b], scope="global")
    assert torch.equal(k_a, k_b)


def test_kernel_term_repels_with_paper_sign_and_attracts_with_official_sign():
    x = _particles(4, (6,), seed=5)
    zero = torch.zeros_like(x)
    before = mean_pairwise_distance([x])
    (paper,) = svgd_gradients([x], [zero], sign="paper")
    (official,) = svgd_gradients([x], [zero], sign="official_code")
    lr = 0.05
    assert mean_pairwise_distance([x - lr * paper]) > before
    assert mean_pairwise_distance([x - lr * official]) < before
    torch.testing.assert_close(official, -2 * paper)


def test_svgd_gradient_matches_hand_formula():
    x, g = _particles(3, (4,), seed=6), _particles(3, (4,), seed=7)
    sigma = 0.9
    (out,) = svgd_gradients([x], [g], bandwidth=sigma)
    for i in range(3):
        expected = torch.zeros(4, dtype=torch.float64)
        for j in range(3):
            k = torch.exp(-((x[i] - x[j]) ** 2).sum() / (2 * sigma**2))
            expected += k * g[j] - k * (x[i] - x[j]) / sigma**2
        torch.testing.assert_close(out[i], expected / 3)


def test_bad_arguments_are_refused():
    x = _particles(2, (2,))
    with pytest.raises(ValueError, match="scope"):
        kernel_matrices([x], scope="layer")
    with pytest.raises(ValueError, match="sign"):
        svgd_gradients([x], [x], sign="negative")
    with pytest.raises(ValueError, match="bandwidth"):
        rbf_kernel(squared_distances(x), -1.0)

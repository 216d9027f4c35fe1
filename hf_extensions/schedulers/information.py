"""Information-theoretic view of signal-to-noise diffusion: MMSE(SNR) and the I-MMSE relation.

Doan et al. (arXiv 2408.04221, Sec. 4) connect S2N diffusion to the information theory of the
Gaussian channel y = sqrt(snr) x + n (n ~ N(0, I)), which is the diffusion marginal
z_t = α x + σ ε seen as y = z_t / σ with snr = SNR(t):

- the optimal denoiser is the posterior mean E[x | z_t] (Tweedie), which a diffusion model's
  data prediction x̂0 estimates, and its error is mmse(snr) = E‖x − E[x | y]‖²;
- the I-MMSE relation (Guo, Shamai & Verdú 2005): d/dsnr I(x; y) = ½ mmse(snr) (nats), so
  I(snr) = ½ ∫_0^snr mmse(γ) dγ.

:class:`GaussianMixture` is data whose posterior mean is exact in closed form, so both sides
of the relation can be computed independently (the left from the entropy of the mixture density
of y, the right from the exact MMSE) and checked; the same class is the exact (and, scaled,
biased) denoiser of the scheduler benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "GaussianMixture",
    "excess_mse",
    "gaussian_mmse",
    "i_mmse_mutual_information",
    "mmse",
    "mmse_of_denoiser",
    "mutual_information",
]


@dataclass
class GaussianMixture:
    """x ~ Σ_k π_k N(μ_k, s_k² I) in d dimensions (isotropic components), float64.

    Args:
        weights: π, shape [K], positive (normalised here).
        means: μ, shape [K, d] (or [K] for d = 1).
        stds: s, shape [K], positive.
    """

    weights: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor

    def __post_init__(self):
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64)
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.stds = torch.as_tensor(self.stds, dtype=torch.float64)
        if self.means.dim() == 1:
            self.means = self.means.unsqueeze(1)
        k = len(self.weights)
        if self.weights.dim() != 1 or k < 1 or (self.weights <= 0).any():
            raise ValueError(f"weights={self.weights.tolist()} must be a 1-D positive vector.")
        if self.means.shape[0] != k or self.means.dim() != 2:
            raise ValueError(f"means must have shape [{k}, d], got {tuple(self.means.shape)}.")
        if self.stds.shape != (k,) or (self.stds <= 0).any():
            raise ValueError(f"stds={self.stds.tolist()} must be {k} positive numbers.")
        self.weights = self.weights / self.weights.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        """Cov(x) = Σ π_k (s_k² I + μ_k μ_kᵀ) − m mᵀ."""
        m = self.mean()
        second = torch.einsum("k,ki,kj->ij", self.weights, self.means, self.means)
        second = second + (self.weights @ self.stds**2) * torch.eye(self.dim, dtype=torch.float64)
        return second - torch.outer(m, m)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n i.i.d. draws, shape [n, d]."""
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[component] + self.stds[component, None] * noise

    def _noisy_log_joint(self, z: torch.Tensor, alpha, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """log π_k N(z; α μ_k, (α² s_k² + σ²) I) per component, shape [K, n], and the variances.

        Components run along the first axis: reductions over K are then over contiguous rows,
        several times faster on a CPU than over a short last axis.
        """
        variance = alpha**2 * self.stds**2 + sigma**2  # [K]
        shifted = alpha * self.means  # [K, d]
        squared = (
            (z**2).sum(-1).unsqueeze(0) - 2 * shifted @ z.T + (shifted**2).sum(-1, keepdim=True)
        )  # ‖z − α μ_k‖², [K, n]
        log_joint = (
            torch.log(self.weights) - 0.5 * self.dim * torch.log(2 * math.pi * variance)
        ).unsqueeze(1) - 0.5 * squared.clamp_min(0) / variance.unsqueeze(1)
        return log_joint, variance

    def noisy_log_prob(self, z: torch.Tensor, alpha=1.0, sigma=0.0) -> torch.Tensor:
        """log p(z) of z = α x + σ ε (the diffusion marginal), shape [n]."""
        z = torch.as_tensor(z, dtype=torch.float64).reshape(-1, self.dim)
        alpha = torch.as_tensor(alpha, dtype=torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return torch.logsumexp(self._noisy_log_joint(z, alpha, sigma)[0], dim=0)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.noisy_log_prob(x, 1.0, 0.0)

    def posterior_mean(self, z: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """E[x | z] for z = α x + σ ε, exact: Σ_k w_k(z) (μ_k + α s_k²/(α² s_k² + σ²) (z − α μ_k)).

        ``z`` has shape [..., d]; the result has the same shape and dtype. This is the optimal
        (MMSE) data prediction x̂0 of a diffusion model of this data.
        """
        shape, dtype = z.shape, z.dtype
        flat = z.reshape(-1, self.dim).to(torch.float64)
        alpha = torch.as_tensor(alpha, dtype=torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_joint, variance = self._noisy_log_joint(flat, alpha, sigma)
        resp = torch.softmax(log_joint, dim=0)  # [K, n]
        gain = alpha * self.stds**2 / variance  # [K]
        # Σ_k w_k (μ_k (1 − α g_k) + g_k z) = (w ⊙ (1 − α g))ᵀ μ + (wᵀ g) z
        offset = (resp * (1 - alpha * gain).unsqueeze(1)).T @ self.means  # [n, d]
        scale = (resp * gain.unsqueeze(1)).sum(0).unsqueeze(1)  # [n, 1]
        return (offset + scale * flat).reshape(shape).to(dtype)


def gaussian_mmse(snr, variances: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """MMSE of Gaussian data with covariance eigenvalues ``variances``: Σ v_i / (1 + snr v_i).

    Among all data with a given covariance the Gaussian has the largest MMSE (a linear
    estimator achieves this error), so it bounds every other curve from above.
    """
    snr = torch.as_tensor(snr, dtype=torch.float64)
    v = torch.as_tensor(variances, dtype=torch.float64)
    return (v / (1 + snr.unsqueeze(-1) * v)).sum(-1)


def mmse_of_denoiser(
    data: GaussianMixture,
    denoiser,
    snr: float,
    n: int = 20000,
    generator: torch.Generator | None = None,
) -> float:
    """Monte Carlo E‖x − x̂0(z)‖² of any ``denoiser(z, alpha, sigma)`` at one SNR (VP scaling).

    With ``denoiser = data.posterior_mean`` this is mmse(snr); a biased denoiser's excess over
    it is its excess loss in the diffusion objective at that noise level.
    """
    x = data.sample(n, generator=generator)
    alpha = math.sqrt(snr / (1 + snr))
    sigma = math.sqrt(1 / (1 + snr))
    z = alpha * x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return float(((x - denoiser(z, alpha, sigma)) ** 2).sum(-1).mean())


def excess_mse(
    data: GaussianMixture,
    denoiser,
    snr: float,
    n: int = 20000,
    generator: torch.Generator | None = None,
) -> float:
    """E‖x̂0(z) − E[x | z]‖²: how much a denoiser's MSE exceeds mmse(snr) (VP scaling).

    Since E[x | z] is the conditional mean, E‖x − x̂0‖² = mmse + E‖x̂0 − E[x|z]‖² exactly (the
    cross term vanishes), so this Monte Carlo estimate of the excess has much less variance
    than the difference of two Monte Carlo MSEs.
    """
    x = data.sample(n, generator=generator)
    alpha = math.sqrt(snr / (1 + snr))
    sigma = math.sqrt(1 / (1 + snr))
    z = alpha * x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    difference = denoiser(z, alpha, sigma) - data.posterior_mean(z, alpha, sigma)
    return float((difference**2).sum(-1).mean())


def mmse(
    data: GaussianMixture,
    snr,
    n: int = 20000,
    generator: torch.Generator | None = None,
    grid_size: int = 4001,
) -> torch.Tensor:
    """mmse(snr) = E‖x − E[x | sqrt(snr) x + n]‖², one value per entry of ``snr``.

    In one dimension by quadrature: mmse = E[x²] − ∫ E[x|y]² p(y) dy on a fine grid of y
    (deterministic); in more dimensions by Monte Carlo with ``n`` draws (the posterior mean is
    exact, only the outer expectation is sampled).
    """
    snr = torch.as_tensor(snr, dtype=torch.float64).reshape(-1)
    if (snr < 0).any():
        raise ValueError(f"snr must be >= 0, got {snr.tolist()}.")
    second_moment = float((data.weights * ((data.means**2).sum(1) + data.dim * data.stds**2)).sum())
    values = []
    for gamma in snr.tolist():
        root = math.sqrt(gamma)
        if data.dim == 1:
            y, dy = _y_grid(data, root, grid_size)
            density = data.noisy_log_prob(y, root, 1.0).exp()
            posterior = data.posterior_mean(y.unsqueeze(1), root, 1.0).squeeze(1)
            values.append(second_moment - float((posterior**2 * density).sum() * dy))
        else:
            x = data.sample(n, generator=generator)
            y = root * x + torch.randn(x.shape, generator=generator, dtype=x.dtype)
            values.append(float(((x - data.posterior_mean(y, root, 1.0)) ** 2).sum(-1).mean()))
    return torch.tensor(values, dtype=torch.float64)


def _y_grid(data: GaussianMixture, root_snr: float, size: int) -> tuple[torch.Tensor, float]:
    """A grid covering y = sqrt(snr) x + n for 1-D mixtures (±10 standard deviations)."""
    spread = torch.sqrt(root_snr**2 * data.stds**2 + 1)
    lo = float((root_snr * data.means[:, 0] - 10 * spread).min())
    hi = float((root_snr * data.means[:, 0] + 10 * spread).max())
    y = torch.linspace(lo, hi, size, dtype=torch.float64)
    return y, (hi - lo) / (size - 1)


def mutual_information(
    data: GaussianMixture,
    snr,
    n: int = 20000,
    generator: torch.Generator | None = None,
    grid_size: int = 4001,
) -> torch.Tensor:
    """I(x; sqrt(snr) x + n) in nats, from the entropy of the mixture density of y.

    I = h(y) − h(n) = −E log p(y) − (d/2) log(2πe); in one dimension h(y) is a quadrature of
    −p log p, in more dimensions a Monte Carlo mean of −log p(y) (exact log density).
    """
    snr = torch.as_tensor(snr, dtype=torch.float64).reshape(-1)
    noise_entropy = 0.5 * data.dim * math.log(2 * math.pi * math.e)
    values = []
    for gamma in snr.tolist():
        root = math.sqrt(gamma)
        if data.dim == 1:
            y, dy = _y_grid(data, root, grid_size)
            log_p = data.noisy_log_prob(y, root, 1.0)
            entropy = -float((log_p.exp() * log_p).sum() * dy)
        else:
            x = data.sample(n, generator=generator)
            y = root * x + torch.randn(x.shape, generator=generator, dtype=x.dtype)
            entropy = -float(data.noisy_log_prob(y, root, 1.0).mean())
        values.append(entropy - noise_entropy)
    return torch.tensor(values, dtype=torch.float64)


def i_mmse_mutual_information(snr_grid, mmse_values) -> torch.Tensor:
    """I(snr) = ½ ∫_0^snr mmse(γ) dγ (the I-MMSE relation), cumulatively at every grid point.

    ``snr_grid`` must start at 0 and increase. The integral is scipy's cumulative Simpson
    rule (third order on uneven grids), which on the geometric grids MMSE curves need is far
    more accurate than the trapezoid rule (mmse is convex in snr).
    """
    from scipy.integrate import cumulative_simpson

    grid = np.asarray(snr_grid, dtype=np.float64)
    values = np.asarray(mmse_values, dtype=np.float64)
    if (
        grid.ndim != 1
        or grid.shape != values.shape
        or len(grid) < 3
        or grid[0] != 0
        or np.any(np.diff(grid) <= 0)
    ):
        raise ValueError(
            "snr_grid must be increasing, start at 0, have at least 3 points and match mmse_values."
        )
    return torch.from_numpy(0.5 * cumulative_simpson(values, x=grid, initial=0.0))

"""Reading a converted model: its Gaussian layers, posterior statistics, divergences between peers.

The closed-form ``KL(q || p)`` of Bayes by Backprop (Blundell et al. 2015, Sec. 3.2), the Gaussian
divergences between two peers' posteriors used by the parameter-diversity term (Wasserstein-2 or
KL), and contexts that evaluate a model at its posterior mean or with frozen noise.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hf_extensions.bnn.layers import bayesian_layers
from hf_extensions.validation import check_choice

GAUSSIAN_DIVERGENCES = ("wasserstein", "kl")


# ---------------------------------------------------------------------------------------------
# reading a converted model
# ---------------------------------------------------------------------------------------------


@dataclass
class FlatPosterior:
    """A model's mean-field Gaussian posterior as flat vectors (all Gaussian weights, in order).

    One vector per quantity makes the per-step terms (KL, parameter divergence) a handful of
    kernels instead of a handful per tensor, which is what they cost on small models.

    Attributes:
        mu, sigma: ``[P]`` posterior means and standard deviations (differentiable).
        prior_mean, prior_std: the prior's, a float when shared by every weight, else ``[P]``.
    """

    mu: torch.Tensor
    sigma: torch.Tensor
    prior_mean: torch.Tensor | float
    prior_std: torch.Tensor | float

    def kl(self) -> torch.Tensor:
        """Closed-form ``KL(q || p)``, summed (Blundell et al. 2015; see the module docstring)."""
        mu, sigma, m, s = self.mu.float(), self.sigma.float(), self.prior_mean, self.prior_std
        diff = mu if isinstance(m, float) and m == 0.0 else mu - m
        if isinstance(s, float):
            quadratic = (sigma.pow(2).sum() + diff.pow(2).sum()) / (2 * s**2)
            return quadratic - torch.log(sigma).sum() + mu.numel() * (math.log(s) - 0.5)
        return (torch.log(s) - torch.log(sigma) + (sigma**2 + diff**2) / (2 * s**2) - 0.5).sum()


def flat_posterior(model: nn.Module) -> FlatPosterior:
    """:class:`FlatPosterior` of every Gaussian layer of ``model`` (:func:`gaussian_parameters` order)."""
    layers = [layer for _, layer in bayesian_layers(model)]
    if not layers:
        raise ValueError("the model has no Gaussian layers (convert_to_bayesian it first).")
    mus, rhos, means, stds = [], [], [], []
    for layer in layers:
        for name in ("weight", "bias"):
            mu = getattr(layer, name)
            if mu is None:
                continue
            mus.append(mu.reshape(-1))
            rhos.append(getattr(layer, f"{name}_rho").reshape(-1))
            means.append(layer._prior_mean(name))
            stds.append(layer.prior_std)
    mu, sigma = torch.cat(mus), F.softplus(torch.cat(rhos))
    if all(isinstance(m, float) for m in means):
        prior_mean: torch.Tensor | float = 0.0
    else:
        prior_mean = torch.cat(
            [
                m.detach().reshape(-1).float()
                if isinstance(m, torch.Tensor)
                else mu.new_zeros(x.numel())
                for m, x in zip(means, mus)
            ]
        )
    if len(set(stds)) == 1:
        prior_std: torch.Tensor | float = stds[0]
    else:
        prior_std = torch.cat([mu.new_full((x.numel(),), s) for s, x in zip(stds, mus)]).float()
    return FlatPosterior(mu=mu, sigma=sigma, prior_mean=prior_mean, prior_std=prior_std)


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """``KL(q || p)`` of all the model's Gaussian layers (0 for a deterministic model)."""
    if not bayesian_layers(model):
        # host: a 0-d CPU tensor adds to a loss on any device (no parameters to take it from)
        return torch.zeros(())
    return flat_posterior(model).kl()


def gaussian_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``[(name, mu, sigma)]`` for every Gaussian weight and bias (``name`` = parameter name)."""
    return [
        (f"{layer_name}.{name}", mu, sigma)
        for layer_name, layer in bayesian_layers(model)
        for name, mu, sigma in layer.gaussian_parameters()
    ]


def gaussian_divergence(
    mu_a: torch.Tensor,
    sigma_a: torch.Tensor,
    mu_b: torch.Tensor,
    sigma_b: torch.Tensor,
    kind: str = "wasserstein",
) -> torch.Tensor:
    """Element-wise divergence between 1-D Gaussians ``N(mu_a, sigma_a^2)`` and ``N(mu_b, sigma_b^2)``.

    - ``"wasserstein"``: the squared 2-Wasserstein (optimal-transport) distance, closed form for
      Gaussians (Dowson & Landau 1982; Givens & Shortt 1984); for a diagonal covariance it is
      ``|mu_a - mu_b|^2 + B(S_a, S_b)^2`` with the Bures distance ``B`` reducing to
      ``|sigma_a - sigma_b|``, i.e. ``(mu_a - mu_b)^2 + (sigma_a - sigma_b)^2`` per weight;
    - ``"kl"``: ``KL(N_a || N_b) = log(sigma_b / sigma_a) + (sigma_a^2 + (mu_a - mu_b)^2) /
      (2 sigma_b^2) - 1/2``.

    Summing over the weights gives the divergence between the diagonal Gaussian posteriors.
    """
    check_choice("kind", kind, GAUSSIAN_DIVERGENCES)
    if kind == "wasserstein":
        return (mu_a - mu_b) ** 2 + (sigma_a - sigma_b) ** 2
    return (
        torch.log(sigma_b)
        - torch.log(sigma_a)
        + (sigma_a**2 + (mu_a - mu_b) ** 2) / (2 * sigma_b**2)
    ) - 0.5


@torch.no_grad()
def peer_distance(model_a: nn.Module, model_b: nn.Module, kind: str = "wasserstein") -> float:
    """Mean over the Gaussian weights of :func:`gaussian_divergence` between two converted models.

    Both models must have the same Gaussian layers (same names and shapes).
    """
    params_a, params_b = gaussian_parameters(model_a), gaussian_parameters(model_b)
    _check_aligned(params_a, params_b)
    if not params_a:
        raise ValueError("the models have no Gaussian layers (convert_to_bayesian them first).")
    total = sum(
        gaussian_divergence(mu_a.float(), s_a.float(), mu_b.float(), s_b.float(), kind).sum()
        for (_, mu_a, s_a), (_, mu_b, s_b) in zip(params_a, params_b)
    )
    count = sum(mu.numel() for _, mu, _ in params_a)
    return float(total / count)


def _check_aligned(params_a, params_b) -> None:
    shapes_a = [(n, tuple(mu.shape)) for n, mu, _ in params_a]
    shapes_b = [(n, tuple(mu.shape)) for n, mu, _ in params_b]
    if shapes_a != shapes_b:
        raise ValueError(
            "the peers' Gaussian layers differ (names or shapes): a parameter-space divergence "
            "needs peers of the same architecture converted the same way."
        )


@contextlib.contextmanager
def posterior_mean(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every Gaussian layer uses its means (a deterministic network)."""
    layers = [layer for _, layer in bayesian_layers(model)]
    before = [layer.sampling for layer in layers]
    for layer in layers:
        layer.sampling = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, before):
            layer.sampling = state


@contextlib.contextmanager
def fixed_noise(model: nn.Module, seed: int = 0) -> Iterator[nn.Module]:
    """Inside the block every forward uses the same ``eps`` (drawn once, from ``seed``).

    Weights are still ``mu + softplus(rho) * eps`` (gradients reach ``mu`` and ``rho``), but
    the draw is frozen ("common random numbers"): two runs that differ only in how a batch is
    split give the same weights, which is how gradient accumulation is tested. Reparameterisation
    estimator only (Flipout's per-example signs are drawn per batch).
    """
    # host: fixed_noise draws once per block, the same on every device
    generator = torch.Generator().manual_seed(seed)
    layers = [layer for _, layer in bayesian_layers(model)]
    for layer in layers:
        eps = {}
        for name in ("weight", "bias"):
            mu = getattr(layer, name)
            if mu is not None:
                # host: see the generator above
                eps[name] = torch.randn(mu.shape, generator=generator, dtype=torch.float32).to(
                    device=mu.device, dtype=mu.dtype
                )
        layer._fixed_eps = eps
    try:
        yield model
    finally:
        for layer in layers:
            layer._fixed_eps = None

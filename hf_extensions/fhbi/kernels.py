"""Particle kernels for Stein variational methods (SVGD, FHBI): RBF kernel and its gradient.

A set of ``m`` particles is given as tensors whose first dimension indexes the particle
(``[m, ...]``, e.g. one stacked LoRA weight of every particle). The kernel is

    K_ij = exp(-||θ_i - θ_j||² / (2σ²))

with σ fixed or from the median heuristic σ² = med(d²) / (2 log(m + 1)) (Liu & Wang, "Stein
Variational Gradient Descent", NeurIPS 2016, Sec. 5; the form of their reference code). The
repulsive term of the SVGD / FHBI direction (Truong et al., "Improving Generalization with Flat
Hilbert Bayesian Inference", ICML 2025, Eq. of the functional gradient, Algorithm 1) is

    r_i = Σ_j ∇_{θ_j} K(θ_j, θ_i) = Σ_j K_ij (θ_i - θ_j) / σ²

in closed form (no autograd), and the descent gradient handed to an optimizer is

    grad_i = (1/m) Σ_j [K_ij g_j - ∇_{θ_j} K(θ_j, θ_i)] = (1/m) [(K g)_i - r_i]

where ``g_j`` is the gradient of particle j's negative log posterior.

Scope: ``"block"`` computes one kernel per parameter tensor (as FHBI's official code does), so
each tensor of each particle is mixed with the same tensor of the others; ``"global"`` computes
one kernel over the whole flattened particle (the paper's definition).

Safe at the edges: identical particles (zero distance) and a zero bandwidth (one particle, or a
median of zero) give ``K_ii = 1``, ``K_ij = 0`` for distinct particles, and a zero kernel
gradient, never NaN: σ² is clamped at :data:`MIN_BANDWIDTH2`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hf_extensions.validation import check_choice, check_positive

KERNEL_SCOPES = ("block", "global")
#: ``"paper"``: repulsive term as derived (grad = (Kg - r)/m). ``"official_code"``: the sign and
#: factor 2 of FHBI's official code (grad = (Kg + 2r)/m), which attracts the particles; only for
#: reproducing it.
KERNEL_GRAD_SIGNS = ("paper", "official_code")
_REPULSION_COEFFICIENT = {"paper": -1.0, "official_code": 2.0}

#: Smallest σ² used; a smaller (or zero) bandwidth is clamped to it.
MIN_BANDWIDTH2 = 1e-12


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """``[m, m]`` matrix of ||x_i - x_j||² over all but the first dimension (float32 or wider).

    Computed from differences (not the ``|a|² + |b|² - 2ab`` expansion): exactly zero on the
    diagonal and between identical particles, never negative.
    """
    flat = x.detach().reshape(x.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    diff = flat.unsqueeze(1) - flat.unsqueeze(0)
    return diff.pow(2).sum(-1)


def median_bandwidth2(sq_dists: torch.Tensor) -> torch.Tensor:
    """σ² = med(d²) / (2 log(m + 1)) over the distinct pairs (i < j); ``MIN_BANDWIDTH2`` if m = 1.

    The median is the interpolated one (``torch.quantile(·, 0.5)``) of the m(m-1)/2 pairwise
    squared distances. Liu & Wang's code takes the median over the full matrix, zeros of the
    diagonal included; leaving them out makes the bandwidth independent of that artefact.
    """
    m = sq_dists.shape[0]
    if m < 2:
        return sq_dists.new_tensor(MIN_BANDWIDTH2)
    rows, cols = torch.triu_indices(m, m, offset=1, device=sq_dists.device)
    median = torch.quantile(sq_dists[rows, cols], 0.5)
    return (median / (2.0 * math.log(m + 1))).clamp_min(MIN_BANDWIDTH2)


def rbf_kernel(
    sq_dists: torch.Tensor, bandwidth: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K, σ²)``: K = exp(-d² / (2σ²)) from squared distances; σ fixed, or median if ``None``."""
    if bandwidth is None:
        sigma2 = median_bandwidth2(sq_dists)
    else:
        check_positive("bandwidth", bandwidth, allow_zero=True)
        sigma2 = sq_dists.new_tensor(max(bandwidth**2, MIN_BANDWIDTH2))
    return torch.exp(-sq_dists / (2.0 * sigma2)), sigma2


def rbf_kernel_gradient(
    x: torch.Tensor, kernel: torch.Tensor, sigma2: torch.Tensor
) -> torch.Tensor:
    """``r`` with ``r_i = Σ_j ∇_{x_j} K(x_j, x_i) = Σ_j K_ij (x_i - x_j) / σ²``, shaped like ``x``.

    Closed form ``(x_i Σ_j K_ij - (K x)_i) / σ²``; the direction that pushes x_i away from the
    particles near it.
    """
    flat = x.detach().reshape(x.shape[0], -1)
    k = kernel.to(flat.dtype)
    r = (flat * k.sum(1, keepdim=True) - k @ flat) / sigma2.to(flat.dtype)
    return r.reshape(x.shape)


def kernel_matrices(
    particles: Sequence[torch.Tensor],
    *,
    bandwidth: float | None = None,
    scope: str = "block",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(K, σ²)`` for every tensor of ``particles`` (``[m, ...]`` each): one per tensor with
    ``scope="block"``, the same global one for every tensor with ``scope="global"``."""
    check_choice("scope", scope, KERNEL_SCOPES)
    if not particles:
        return []
    if scope == "block":
        return [rbf_kernel(squared_distances(x), bandwidth) for x in particles]
    home = particles[0].device
    total = sum(squared_distances(x).to(home, torch.float64) for x in particles)
    kernel, sigma2 = rbf_kernel(total, bandwidth)
    return [(kernel, sigma2)] * len(particles)


def _flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[m, D]``: every ``[m, ...]`` tensor flattened and concatenated along the last dimension."""
    m = tensors[0].shape[0]
    return torch.cat([t.detach().reshape(m, -1) for t in tensors], dim=1)


def particle_sq_distances(particles: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[m, m]`` squared distances between whole particles (all their tensors together)."""
    return squared_distances(_flatten(particles))


def svgd_gradients(
    particles: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    *,
    bandwidth: float | None = None,
    scope: str = "block",
    sign: str = "paper",
    repulsion: bool = True,
    sq_dists: torch.Tensor | None = None,
) -> list[torch.Tensor | None]:
    """The SVGD/FHBI descent gradient ``(1/m)[(K g)_i - r_i]`` for every tensor (Liu & Wang 2016,
    Eq. 8, with ``g = -∇ log p``; FHBI takes ``g`` at the perturbed particles).

    Args:
        particles: the particles' tensors, ``[m, ...]`` each, at the *unperturbed* point.
        grads: the loss gradients with the same shapes (``None``: the entry stays ``None``).
        bandwidth: σ; ``None`` for the median heuristic.
        scope: ``"block"`` (a kernel per tensor) or ``"global"``.
        sign: ``"paper"`` (repulsive) or ``"official_code"`` (see :data:`KERNEL_GRAD_SIGNS`).
        repulsion: ``False`` drops the kernel-gradient term (kernel-smoothed gradients only).
        sq_dists: ``scope="global"`` only: :func:`particle_sq_distances` already computed.

    ``scope="global"`` works on all tensors at once (one ``[m, D]`` concatenation, two matmuls),
    so its cost does not grow with the number of tensors.
    """
    check_choice("sign", sign, KERNEL_GRAD_SIGNS)
    check_choice("scope", scope, KERNEL_SCOPES)
    if len(grads) != len(particles):
        raise ValueError(f"{len(grads)} gradients for {len(particles)} particle tensors.")
    coefficient = _REPULSION_COEFFICIENT[sign]
    index = [i for i, g in enumerate(grads) if g is not None]
    out: list[torch.Tensor | None] = [None] * len(grads)
    if not index:
        return out
    if scope == "global":
        x = _flatten(particles)
        if sq_dists is None:
            sq_dists = squared_distances(x)
        kernel, sigma2 = rbf_kernel(sq_dists, bandwidth)
        present = [grads[i] for i in index]
        g = _flatten(present)
        k = kernel.to(g.dtype)
        mixed = k @ g
        if repulsion:
            r = rbf_kernel_gradient(x, kernel, sigma2)
            if len(index) < len(grads):  # drop the columns of tensors without a gradient
                keep = torch.cat(
                    [
                        torch.full((particles[i][0].numel(),), i in index, device=x.device)
                        for i in range(len(grads))
                    ]
                )
                r = r[:, keep]
            mixed = mixed + coefficient * r.to(g.dtype)
        mixed = mixed / x.shape[0]
        for i, piece in zip(index, mixed.split([grads[i][0].numel() for i in index], dim=1)):
            out[i] = piece.reshape(grads[i].shape)
        return out
    for i in index:
        x, g = particles[i], grads[i]
        kernel, sigma2 = rbf_kernel(squared_distances(x), bandwidth)
        m = x.shape[0]
        k = kernel.to(device=g.device, dtype=g.dtype)
        mixed = (k @ g.reshape(m, -1)).reshape(g.shape)
        if repulsion:
            r = rbf_kernel_gradient(x, kernel.to(x.device), sigma2.to(x.device))
            mixed = mixed + coefficient * r.to(device=g.device, dtype=g.dtype)
        out[i] = mixed / m
    return out


def mean_pairwise_distance(
    particles: Sequence[torch.Tensor], sq_dists: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over pairs i < j of the Euclidean distance between whole particles (for tests/logs)."""
    total = (sq_dists if sq_dists is not None else particle_sq_distances(particles)).double()
    m = total.shape[0]
    if m < 2:
        return total.new_zeros(())
    rows, cols = torch.triu_indices(m, m, offset=1)
    return total[rows, cols].sqrt().mean()

"""Mean-field Gaussian layers, conversion of any model to a BNN, and a module holding peer models.

Bayes by Backprop (Blundell et al., "Weight Uncertainty in Neural Networks", ICML 2015,
arXiv 1505.05424): every weight has a Gaussian posterior ``q(w) = N(mu, sigma^2)`` with
``sigma = softplus(rho)`` (Sec. 3.2), a forward pass draws ``w = mu + sigma * eps``,
``eps ~ N(0, I)`` (the reparameterisation trick), and the ELBO's complexity cost is the closed-form
``KL(q || p)`` to a Gaussian prior ``p = N(m, s^2)``::

    KL = sum_i [ log(s / sigma_i) + (sigma_i^2 + (mu_i - m_i)^2) / (2 s^2) - 1/2 ]

Flipout (Wen et al., "Flipout: Efficient Pseudo-Independent Weight Perturbations on
Mini-Batches", ICLR 2018, arXiv 1803.04386, Eq. 4) is optional: one shared perturbation
``dW = sigma * eps`` decorrelated per example by random sign vectors ``s_n``, ``r_n``:
``y_n = mu x_n + ((x_n * s_n) dW) * r_n``.

Where this departs from bayesian-torch (the library users reach for): its layers return
``(output, kl)``, which breaks every model that feeds a layer's output to the next module. Here a
layer returns its output only, exactly as the deterministic layer it replaces, and the KL is
collected separately (:func:`kl_divergence`), so a converted Hugging Face model still returns its
``ModelOutput``. The Gaussian layers *subclass* ``nn.Linear`` / ``nn.Conv2d``: the posterior mean
is the layer's own ``weight`` / ``bias`` (so code that reads ``layer.weight.dtype``, weight
loading of a deterministic checkpoint into the means, and ``isinstance`` checks keep working) and
the standard deviations live in the extra parameters ``weight_rho`` / ``bias_rho``.

MOPED (Krishnan et al., "Specifying Weight Priors in Bayesian Deep Neural Networks with Empirical
Bayes", AAAI 2020, arXiv 1906.05323): means from a deterministic model and ``sigma = delta |w|``
(``moped_delta``); optionally the prior centred on the deterministic weights
(``prior_mean="pretrained"``).

:class:`PeerEnsemble` holds the K peers of mutual learning (Zhang et al., "Deep Mutual
Learning", CVPR 2018) in ONE ``nn.Module``, so that ``Trainer``, Accelerate, DDP, one optimizer
and checkpointing see one model. In training mode its forward runs each peer once and returns
the peers' logits (and fused multi-stage features when asked); in evaluation mode it returns the
Bayesian model average: the predictive ``p(y|x) = 1/(K T) sum_k sum_t softmax(f_{w_kt}(x))``
over ``T = mc_samples`` posterior draws of each peer (``logits`` = its log, so a softmax of the
logits gives back the averaged probabilities).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from transformers.utils import ModelOutput

__all__ = [
    "ESTIMATORS",
    "GAUSSIAN_DIVERGENCES",
    "PRIOR_MEANS",
    "BayesianConv2d",
    "BayesianLayer",
    "BayesianLinear",
    "FlatPosterior",
    "PeerEnsemble",
    "PeerEnsembleOutput",
    "bayesian_layers",
    "convert_to_bayesian",
    "fixed_noise",
    "flat_posterior",
    "fuse_features",
    "gaussian_divergence",
    "gaussian_parameters",
    "kl_divergence",
    "peer_distance",
    "posterior_mean",
    "rho_from_sigma",
]

ESTIMATORS = ("reparameterization", "flipout")
PRIOR_MEANS = ("zero", "pretrained")
GAUSSIAN_DIVERGENCES = ("wasserstein", "kl")
ENSEMBLE_CONFIG_NAME = "peer_ensemble.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def rho_from_sigma(sigma: torch.Tensor | float, min_sigma: float = 1e-8) -> torch.Tensor:
    """Inverse softplus: ``rho`` with ``softplus(rho) = sigma`` (``sigma`` clamped at ``min_sigma``)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp_min(min_sigma)
    # log(expm1(s)) = s + log(1 - exp(-s)): finite for small and large s alike.
    return sigma + torch.log(-torch.expm1(-sigma))


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")


class BayesianLayer:
    """Mean-field Gaussian posterior over a layer's weight and bias (mixin of the two layers).

    Attributes:
        weight, bias: the posterior means (the deterministic layer's own parameters).
        weight_rho, bias_rho: ``sigma = softplus(rho)``.
        prior_std: ``s`` of the prior ``N(m, s^2)``.
        prior_mean: ``"zero"`` (``m = 0``) or ``"pretrained"`` (``m`` = the buffers
            ``prior_weight_mean`` / ``prior_bias_mean``, the weights the layer was converted from).
        estimator: ``"reparameterization"`` or ``"flipout"``.
        sampling: draw weights in ``forward`` (default); ``False`` uses the means (see
            :func:`posterior_mean`). Train and eval mode both sample: a BNN's prediction averages
            posterior draws.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_rho: nn.Parameter
    bias_rho: nn.Parameter | None

    def _init_gaussian(
        self, prior_std: float, rho_init: float, prior_mean: str, estimator: str
    ) -> None:
        if not prior_std > 0:
            raise ValueError(f"`prior_std` must be > 0, got {prior_std!r}.")
        _check_choice("prior_mean", prior_mean, PRIOR_MEANS)
        _check_choice("estimator", estimator, ESTIMATORS)
        self.prior_std = float(prior_std)
        self.prior_mean = prior_mean
        self.estimator = estimator
        self.sampling = True
        self._fixed_eps: dict[str, torch.Tensor] | None = None
        self.weight_rho = nn.Parameter(torch.full_like(self.weight, float(rho_init)))
        if self.bias is not None:
            self.bias_rho = nn.Parameter(torch.full_like(self.bias, float(rho_init)))
        else:
            self.register_parameter("bias_rho", None)
        if prior_mean == "pretrained":
            self.register_buffer("prior_weight_mean", self.weight.detach().clone())
            if self.bias is not None:
                self.register_buffer("prior_bias_mean", self.bias.detach().clone())

    # -- the posterior ------------------------------------------------------------------------

    def gaussian_parameters(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """``[(name, mu, sigma)]`` for the weight (and the bias)."""
        pairs = [("weight", self.weight, F.softplus(self.weight_rho))]
        if self.bias is not None:
            pairs.append(("bias", self.bias, F.softplus(self.bias_rho)))
        return pairs

    def _prior_mean(self, name: str) -> torch.Tensor | float:
        return getattr(self, f"prior_{name}_mean") if self.prior_mean == "pretrained" else 0.0

    def kl(self) -> torch.Tensor:
        """Closed-form ``KL(q || p)`` summed over the layer's weights and biases (float32)."""
        s = self.prior_std
        total = self.weight.new_zeros((), dtype=torch.float32)
        for name, mu, sigma in self.gaussian_parameters():
            mu, sigma = mu.float(), sigma.float()
            diff = mu - self._prior_mean(name)
            kl = math.log(s) - torch.log(sigma) + (sigma**2 + diff**2) / (2 * s**2) - 0.5
            total = total + kl.sum()
        return total

    # -- sampling -----------------------------------------------------------------------------

    def _eps(self, name: str, like: torch.Tensor) -> torch.Tensor:
        if self._fixed_eps is not None:
            return self._fixed_eps[name]
        return torch.randn_like(like)

    def _sample(self, name: str) -> torch.Tensor | None:
        mu = getattr(self, name)
        if mu is None:
            return None
        return mu + F.softplus(getattr(self, f"{name}_rho")) * self._eps(name, mu)

    def _perturbation(self) -> torch.Tensor:
        """``dW = sigma * eps`` (Flipout's shared perturbation of the weight)."""
        return F.softplus(self.weight_rho) * self._eps("weight", self.weight)

    def _signs(self, x: torch.Tensor, channels: int, channel_dim: int) -> torch.Tensor:
        """Random ±1 per example and channel, broadcast over the other dimensions."""
        if self._fixed_eps is not None:
            raise RuntimeError("fixed_noise() does not support the flipout estimator.")
        shape = [1] * x.dim()
        if x.dim() > 1 and channel_dim != 0:
            shape[0] = x.shape[0]
        shape[channel_dim] = channels
        return torch.randint(0, 2, shape, device=x.device).to(x.dtype) * 2 - 1

    def extra_repr(self) -> str:  # type: ignore[override]
        base = super().extra_repr()  # type: ignore[misc]
        return (
            f"{base}, prior_std={self.prior_std}, prior_mean={self.prior_mean}, "
            f"estimator={self.estimator}"
        )


class BayesianLinear(BayesianLayer, nn.Linear):
    """``nn.Linear`` with a mean-field Gaussian posterior (Blundell et al. 2015).

    ``forward`` returns a tensor, like ``nn.Linear``. Build one from a deterministic layer with
    :meth:`from_linear` or for a whole model with :func:`convert_to_bayesian`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        prior_std: float = 1.0,
        posterior_rho_init: float = -3.0,
        prior_mean: str = "zero",
        estimator: str = "reparameterization",
        device=None,
        dtype=None,
    ):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_gaussian(prior_std, posterior_rho_init, prior_mean, estimator)

    @classmethod
    def from_linear(cls, layer: nn.Linear, **kwargs) -> BayesianLinear:
        """A Gaussian layer whose means are ``layer``'s weights (see :func:`convert_to_bayesian`)."""
        return _from_deterministic(
            cls,
            layer,
            dict(
                in_features=layer.in_features,
                out_features=layer.out_features,
                bias=layer.bias is not None,
            ),
            **kwargs,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.sampling:
            return F.linear(input, self.weight, self.bias)
        if self.estimator == "reparameterization":
            return F.linear(input, self._sample("weight"), self._sample("bias"))
        # Flipout: y = mu x + ((x * s) dW) * r, bias drawn once for the batch.
        mean = F.linear(input, self.weight, self._sample("bias"))
        sign_in = self._signs(input, self.in_features, input.dim() - 1)
        sign_out = self._signs(input, self.out_features, input.dim() - 1)
        return mean + F.linear(input * sign_in, self._perturbation()) * sign_out


class BayesianConv2d(BayesianLayer, nn.Conv2d):
    """``nn.Conv2d`` with a mean-field Gaussian posterior (Blundell et al. 2015)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        prior_std: float = 1.0,
        posterior_rho_init: float = -3.0,
        prior_mean: str = "zero",
        estimator: str = "reparameterization",
        device=None,
        dtype=None,
    ):
        nn.Conv2d.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_gaussian(prior_std, posterior_rho_init, prior_mean, estimator)

    @classmethod
    def from_conv2d(cls, layer: nn.Conv2d, **kwargs) -> BayesianConv2d:
        """A Gaussian layer whose means are ``layer``'s weights (see :func:`convert_to_bayesian`)."""
        return _from_deterministic(
            cls,
            layer,
            dict(
                in_channels=layer.in_channels,
                out_channels=layer.out_channels,
                kernel_size=layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                groups=layer.groups,
                bias=layer.bias is not None,
                padding_mode=layer.padding_mode,
            ),
            **kwargs,
        )

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.sampling:
            return self._conv_forward(input, self.weight, self.bias)
        if self.estimator == "reparameterization":
            return self._conv_forward(input, self._sample("weight"), self._sample("bias"))
        mean = self._conv_forward(input, self.weight, self._sample("bias"))
        channel_dim = input.dim() - 3  # (N, C, H, W) or unbatched (C, H, W)
        sign_in = self._signs(input, self.in_channels, channel_dim)
        sign_out = self._signs(input, self.out_channels, channel_dim)
        return mean + self._conv_forward(input * sign_in, self._perturbation(), None) * sign_out


_CONVERTIBLE: dict[type[nn.Module], Callable[..., BayesianLayer]] = {
    nn.Linear: BayesianLinear.from_linear,
    nn.Conv2d: BayesianConv2d.from_conv2d,
}


def _from_deterministic(
    cls,
    layer: nn.Module,
    shape_kwargs: dict[str, Any],
    *,
    prior_std: float = 1.0,
    posterior_rho_init: float = -3.0,
    init_from_pretrained: bool = True,
    moped_delta: float | None = None,
    prior_mean: str = "zero",
    estimator: str = "reparameterization",
):
    weight = layer.weight
    with torch.no_grad():
        new = cls(
            **shape_kwargs,
            prior_std=prior_std,
            posterior_rho_init=posterior_rho_init,
            prior_mean="zero",  # the prior buffers are set below, from the right weights
            estimator=estimator,
            device=weight.device,
            dtype=weight.dtype,
        )
        if init_from_pretrained:
            new.weight.copy_(weight)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        if moped_delta is not None:  # MOPED: sigma = delta * |w|
            for name, rho in (("weight", new.weight_rho), ("bias", new.bias_rho)):
                if rho is not None:
                    rho.copy_(rho_from_sigma(moped_delta * getattr(layer, name).abs()))
        if prior_mean == "pretrained":
            new.prior_mean = "pretrained"
            new.register_buffer("prior_weight_mean", weight.detach().clone())
            if layer.bias is not None:
                new.register_buffer("prior_bias_mean", layer.bias.detach().clone())
    new.train(layer.training)
    return new


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """PEFT-style target matching: ``name`` equals a pattern or ends with ``"." + pattern``."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def convert_to_bayesian(
    model: nn.Module,
    prior_std: float = 1.0,
    posterior_rho_init: float = -3.0,
    init_from_pretrained: bool = True,
    *,
    moped_delta: float | None = None,
    prior_mean: str = "zero",
    estimator: str = "reparameterization",
    target_modules: Sequence[str] | None = None,
    exclude_modules: Sequence[str] = (),
) -> nn.Module:
    """Replace, in place, the ``nn.Linear`` and ``nn.Conv2d`` layers of ``model`` by Gaussian ones.

    The model's ``forward`` is untouched and returns what it returned before (a Hugging Face
    ``ModelOutput``, a dict, a tensor); the KL term is read with :func:`kl_divergence`.

    Args:
        model: any ``nn.Module`` (a ``transformers`` model, a plain PyTorch network).
        prior_std: ``s`` of the prior ``N(m, s^2)`` (Blundell et al. use a scale mixture; a
            single ``N(0, 1)`` is the common choice and the default here).
        posterior_rho_init: initial ``rho`` (``sigma = softplus(rho)``; -3 gives 0.049).
        init_from_pretrained: posterior means = the model's current weights (the paper's starred
            results start from a deterministic model). ``False`` re-initialises them as the
            deterministic layer's ``reset_parameters`` would.
        moped_delta: MOPED initialisation ``sigma = delta |w|`` (Krishnan et al. 2020) instead of
            the constant ``posterior_rho_init``.
        prior_mean: ``"zero"`` or ``"pretrained"`` (the prior is centred on the weights the
            layer is converted from, MOPED's empirical-Bayes prior).
        estimator: ``"reparameterization"`` (one weight draw per forward, shared by the batch)
            or ``"flipout"`` (pseudo-independent draws per example, Wen et al. 2018).
        target_modules: convert only these modules (names, or suffixes after a dot, as in PEFT);
            default every convertible one.
        exclude_modules: never convert these (e.g. ``["classifier"]`` for a deterministic head).

    Only layers whose type is exactly ``nn.Linear`` or ``nn.Conv2d`` are converted: subclasses
    with their own semantics (e.g. ``nn.MultiheadAttention``'s ``out_proj``, whose weight the
    attention reads directly) and layers whose weight is shared with another module (tied
    embeddings) are left deterministic, since replacing them would silently untie or bypass
    them. Already converted layers are left as they are, so converting twice is harmless.

    Returns:
        ``model`` itself.
    """
    if moped_delta is not None and not moped_delta > 0:
        raise ValueError(f"`moped_delta` must be > 0, got {moped_delta!r}.")
    if moped_delta is not None and not init_from_pretrained:
        raise ValueError("`moped_delta` needs `init_from_pretrained=True` (sigma = delta |w|).")
    _check_choice("prior_mean", prior_mean, PRIOR_MEANS)
    _check_choice("estimator", estimator, ESTIMATORS)
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    replacements = []
    for name, module in model.named_modules():
        factory = _CONVERTIBLE.get(type(module))
        if factory is None or not name:
            continue
        if target_modules is not None and not _matches(name, target_modules):
            continue
        if _matches(name, exclude_modules):
            continue
        if any(uses[id(p)] > 1 for p in module.parameters(recurse=False)):
            continue  # tied weight
        replacements.append((name, factory))
    for name, factory in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = factory(
            getattr(parent, child),
            prior_std=prior_std,
            posterior_rho_init=posterior_rho_init,
            init_from_pretrained=init_from_pretrained,
            moped_delta=moped_delta,
            prior_mean=prior_mean,
            estimator=estimator,
        )
        setattr(parent, child, layer)
    if target_modules is not None:
        converted = {name for name, _ in bayesian_layers(model)}
        missing = [t for t in target_modules if not any(_matches(n, [t]) for n in converted)]
        if missing:
            raise ValueError(f"`target_modules` {missing} matched no convertible layer.")
    return model


# ---------------------------------------------------------------------------------------------
# reading a converted model
# ---------------------------------------------------------------------------------------------


def bayesian_layers(model: nn.Module) -> list[tuple[str, BayesianLayer]]:
    """``[(name, layer)]`` of the Gaussian layers of ``model``, in ``named_modules`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BayesianLayer)]


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
    _check_choice("kind", kind, GAUSSIAN_DIVERGENCES)
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
    generator = torch.Generator().manual_seed(seed)
    layers = [layer for _, layer in bayesian_layers(model)]
    for layer in layers:
        eps = {}
        for name in ("weight", "bias"):
            mu = getattr(layer, name)
            if mu is not None:
                eps[name] = torch.randn(mu.shape, generator=generator, dtype=torch.float32).to(
                    device=mu.device, dtype=mu.dtype
                )
        layer._fixed_eps = eps
    try:
        yield model
    finally:
        for layer in layers:
            layer._fixed_eps = None


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------


def _pool(feature: torch.Tensor) -> torch.Tensor:
    """One vector per example: average over space (``[B, C, H, W]``) or tokens (``[B, T, D]``)."""
    if feature.dim() == 4:
        return feature.mean(dim=(2, 3))
    if feature.dim() == 3:
        return feature.mean(dim=1)
    return feature.flatten(1)


def fuse_features(stages: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fuse multi-stage features into one ``[B, D]`` vector per example.

    Each stage is pooled to ``[B, D_s]`` (mean over spatial positions or tokens), standardised
    over its channels (zero mean, unit variance: a layer norm without affine parameters, so that
    every stage counts on the same scale whatever its activation range) and the stages are
    concatenated. Parameter-free, so it adds nothing to train or save. The paper fuses features of
    several stages before its feature-diversity term; its exact fusion could not be read offline,
    and this form is ours.
    """
    if not stages:
        raise ValueError("no feature stage was captured.")
    pooled = [_pool(stage.float()) for stage in stages]
    return torch.cat([F.layer_norm(p, p.shape[-1:]) for p in pooled], dim=-1)


# ---------------------------------------------------------------------------------------------
# the peers of mutual learning in one module
# ---------------------------------------------------------------------------------------------


@dataclass
class PeerEnsembleOutput(ModelOutput):
    """Output of :class:`PeerEnsemble`.

    Attributes:
        loss: training mode: the sum over peers of their cross-entropies (each peer's gradient as
            if trained alone); evaluation mode: the NLL of the averaged prediction.
        logits: ``[B, C]``, log of the peers' averaged predictive probabilities.
        peer_logits: training mode only, ``[K, B, C]``.
        peer_features: training mode with feature capture only, ``[K, B, D]`` fused features.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    peer_logits: torch.Tensor | None = None
    peer_features: torch.Tensor | None = None


def _forward_parameters(module: nn.Module) -> tuple[set[str], bool]:
    """Names ``module.forward`` accepts, and whether it takes ``**kwargs``."""
    params = inspect.signature(module.forward).parameters.values()
    names = {
        p.name
        for p in params
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"
    }
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _auto_feature_layers(peer: nn.Module) -> list[str]:
    """Default stages: the blocks of the peer's longest ``nn.ModuleList`` + the head's input.

    The longest ``ModuleList`` is the stack of blocks in most ``transformers`` models
    (``vit.layers``, ``bert.encoder.layer``, ``resnet.encoder.stages``); the input of the last
    ``nn.Linear`` is the penultimate (pooled) representation.
    """
    lists = [(n, m) for n, m in peer.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    names: list[str] = []
    if lists:
        name, blocks = max(lists, key=lambda item: len(item[1]))
        names.extend(f"{name}.{i}" for i in range(len(blocks)))
    linears = [n for n, m in peer.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        names.append(f"{linears[-1]}:input")
    if not names:
        raise ValueError("could not choose feature layers automatically; name them.")
    return names


class _CaptureHook:
    """Forward (pre-)hook that hands a stage's output (or input) to its ensemble.

    An object rather than a closure, so that ``copy.deepcopy`` and pickling of the ensemble carry
    hooks that point to the copy.
    """

    def __init__(self, ensemble: PeerEnsemble, index: int, is_input: bool):
        self.ensemble = ensemble
        self.index = index
        self.is_input = is_input

    def __call__(self, module, args, output=None):
        self.ensemble._store(self.index, args[0] if self.is_input else output)


class PeerEnsemble(nn.Module):
    """K peer models in one module: one optimizer, accumulation, DDP and checkpoints for all.

    Args:
        peers: the peer models (``transformers`` classifiers, or any module whose forward returns
            a mapping with ``"logits"``); usually Bayesian (:func:`convert_to_bayesian`), but
            deterministic peers work too (plain DML).
        mc_samples: posterior draws per peer averaged by the evaluation-mode forward (20 by
            default; a peer without sampling Gaussian layers is run once).
        feature_layers: stages whose outputs are fused into the features of the
            feature-diversity term (:func:`fuse_features`); a name is a submodule of each peer,
            its output by default or its input with the suffix ``":input"``. ``None``: no feature
            capture; ``"auto"``: :func:`_auto_feature_layers`.

    Inputs: the peers' own inputs (``pixel_values``, ``input_ids``, ``features``...) and
    ``labels``; every peer gets the inputs its ``forward`` accepts. See
    :class:`PeerEnsembleOutput` for what comes back.

    Saving: :meth:`save_pretrained` writes ``model.safetensors`` (all peers' means, ``rho`` and
    buffers) and ``peer_ensemble.json`` (the peers' ``transformers`` configs and how each was
    converted); :meth:`from_pretrained` rebuilds and loads them, strictly.
    """

    # Trainer reads this: the loss is not normalised by `num_items_in_batch` inside the model.
    accepts_loss_kwargs = False

    def __init__(
        self,
        peers: Sequence[nn.Module],
        mc_samples: int = 20,
        feature_layers: Sequence[str] | str | None = None,
    ):
        super().__init__()
        if len(peers) < 1:
            raise ValueError("`peers` must hold at least one model.")
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"`mc_samples` must be an integer >= 1, got {mc_samples!r}.")
        self.peers = nn.ModuleList(peers)
        self.mc_samples = mc_samples
        self._signatures = [_forward_parameters(peer) for peer in self.peers]
        self._captured: list[list[torch.Tensor]] | None = None
        self._hooks: list[Any] = []
        self.feature_layers: list[str] | None = None
        self.set_feature_layers(feature_layers)

    # -- features -----------------------------------------------------------------------------

    def set_feature_layers(self, names: Sequence[str] | str | None) -> None:
        """Capture (and fuse) the outputs of ``names`` in every training-mode forward."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if names is None:
            self.feature_layers = None
            return
        if names == "auto":
            names = _auto_feature_layers(self.peers[0])
        if isinstance(names, str) or not names:
            raise ValueError(f"`feature_layers` must be a list of module names, got {names!r}.")
        self.feature_layers = list(names)
        for index, peer in enumerate(self.peers):
            for spec in self.feature_layers:
                name, _, where = spec.partition(":")
                if where not in ("", "input"):
                    raise ValueError(f"feature layer {spec!r}: the suffix may only be ':input'.")
                try:
                    module = peer.get_submodule(name)
                except AttributeError as error:
                    raise ValueError(f"peer {index} has no submodule {name!r}.") from error
                capture = _CaptureHook(self, index, where == "input")
                if where == "input":
                    hook = module.register_forward_pre_hook(capture)
                else:
                    hook = module.register_forward_hook(capture)
                self._hooks.append(hook)

    def _store(self, index: int, value: Any) -> None:
        if self._captured is None:
            return
        if isinstance(value, (tuple, list)):
            value = value[0]
        elif isinstance(value, dict):
            value = next(iter(value.values()))
        self._captured[index].append(value)

    # -- forward ------------------------------------------------------------------------------

    def input_names(self) -> list[str]:
        """Inputs the peers accept (what ``Trainer`` keeps of a dataset), plus ``labels``."""
        names = set().union(*(names for names, _ in self._signatures)) | {"labels"}
        return sorted(names)

    def _peer_inputs(self, index: int, inputs: dict[str, Any]) -> dict[str, Any]:
        names, any_kwargs = self._signatures[index]
        return inputs if any_kwargs else {k: v for k, v in inputs.items() if k in names}

    def _peer_logits(self, index: int, inputs: dict[str, Any]) -> torch.Tensor:
        output = self.peers[index](**self._peer_inputs(index, inputs))
        return output["logits"] if isinstance(output, dict) else output[0]

    def forward(self, labels: torch.Tensor | None = None, **inputs: Any) -> PeerEnsembleOutput:
        if not self.training:
            log_probs = self.peer_log_probs(**inputs).logsumexp(0) - math.log(len(self.peers))
            loss = F.nll_loss(log_probs, labels) if labels is not None else None
            return PeerEnsembleOutput(loss=loss, logits=log_probs)
        capture = self.feature_layers is not None
        self._captured = [[] for _ in self.peers] if capture else None
        try:
            peer_logits = torch.stack(
                [self._peer_logits(k, inputs) for k in range(len(self.peers))]
            )
            features = (
                torch.stack([fuse_features(stages) for stages in self._captured])
                if capture
                else None
            )
        finally:
            self._captured = None
        log_probs = peer_logits.float().log_softmax(-1)
        logits = log_probs.logsumexp(0) - math.log(len(self.peers))
        loss = None
        if labels is not None:
            loss = sum(F.cross_entropy(z.float(), labels) for z in peer_logits)
        return PeerEnsembleOutput(
            loss=loss, logits=logits, peer_logits=peer_logits, peer_features=features
        )

    def peer_log_probs(self, mc_samples: int | None = None, **inputs: Any) -> torch.Tensor:
        """``[K, B, C]``: each peer's log predictive, averaged over ``mc_samples`` draws."""
        samples = self.mc_samples if mc_samples is None else mc_samples
        per_peer = []
        for index, peer in enumerate(self.peers):
            stochastic = any(layer.sampling for _, layer in bayesian_layers(peer))
            draws = samples if stochastic else 1
            log_probs = torch.stack(
                [self._peer_logits(index, inputs).float().log_softmax(-1) for _ in range(draws)]
            )
            per_peer.append(log_probs.logsumexp(0) - math.log(draws))
        return torch.stack(per_peer)

    # -- saving and loading -------------------------------------------------------------------

    def ensemble_config(self) -> dict[str, Any]:
        """What :meth:`from_pretrained` needs besides the weights (written as JSON)."""
        peers = []
        for peer in self.peers:
            config = getattr(peer, "config", None)
            layers = {
                name: {
                    "type": type(layer).__name__,
                    "prior_std": layer.prior_std,
                    "prior_mean": layer.prior_mean,
                    "estimator": layer.estimator,
                }
                for name, layer in bayesian_layers(peer)
            }
            is_hf = hasattr(config, "to_json_string")
            peers.append(
                {
                    "class": type(peer).__name__,
                    "config": json.loads(config.to_json_string(use_diff=False)) if is_hf else None,
                    # not serialised by transformers, but it changes the numerics
                    "attn_implementation": getattr(config, "_attn_implementation", None)
                    if is_hf
                    else None,
                    "bayesian_layers": layers,
                }
            )
        return {
            "hf_extensions_class": type(self).__name__,
            "format_version": FORMAT_VERSION,
            "num_peers": len(self.peers),
            "mc_samples": self.mc_samples,
            "feature_layers": self.feature_layers,
            "peers": peers,
        }

    def save_config(self, save_directory: str | Path) -> Path:
        """Write ``peer_ensemble.json`` in ``save_directory``."""
        path = Path(save_directory) / ENSEMBLE_CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.ensemble_config(), indent=2) + "\n", encoding="utf-8")
        return path

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Weights as safetensors (shared tensors de-duplicated) and ``peer_ensemble.json``."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_model(self, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        self.save_config(directory)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        peer_factory: Callable[[int], nn.Module] | None = None,
    ) -> PeerEnsemble:
        """Rebuild the peers, convert them as they were, and load the weights (strictly).

        ``transformers`` peers are rebuilt from their saved configs (the class must be one of
        ``transformers``' model classes: nothing else is imported). Other peers need
        ``peer_factory(index)`` returning the deterministic architecture of peer ``index``.
        """
        directory = Path(directory)
        path = directory / ENSEMBLE_CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a saved {cls.__name__}.")
        config = json.loads(path.read_text(encoding="utf-8"))
        if config.get("hf_extensions_class") != cls.__name__:
            raise ValueError(
                f"{path} describes a {config.get('hf_extensions_class')!r}, not a {cls.__name__}."
            )
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format version {config.get('format_version')!r}; this version of "
                f"hf-extensions reads version {FORMAT_VERSION}."
            )
        peers = []
        for index, entry in enumerate(config["peers"]):
            peer = peer_factory(index) if peer_factory is not None else _build_peer(entry, index)
            for name, layer in entry["bayesian_layers"].items():
                if layer["type"] not in {"BayesianLinear", "BayesianConv2d"}:
                    raise ValueError(f"unknown Gaussian layer type {layer['type']!r} for {name}.")
                convert_to_bayesian(
                    peer,
                    prior_std=float(layer["prior_std"]),
                    prior_mean=layer["prior_mean"],
                    estimator=layer["estimator"],
                    target_modules=[name],
                )
            found = sorted(name for name, _ in bayesian_layers(peer))
            if found != sorted(entry["bayesian_layers"]):
                raise ValueError(
                    f"peer {index}: converting gave the Gaussian layers {found}, the checkpoint "
                    f"has {sorted(entry['bayesian_layers'])}."
                )
            peers.append(peer)
        ensemble = cls(peers, mc_samples=int(config["mc_samples"]))
        ensemble.set_feature_layers(config.get("feature_layers"))
        load_model(ensemble, str(directory / WEIGHTS_NAME), strict=True)
        return ensemble.eval()


_CLASS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _build_peer(entry: dict[str, Any], index: int) -> nn.Module:
    """A ``transformers`` model from its saved class name and config (no checkpoint download)."""
    import transformers
    from transformers import AutoConfig, PreTrainedModel

    name, config = entry.get("class"), entry.get("config")
    if config is None:
        raise ValueError(
            f"peer {index} ({name}) is not a transformers model: pass `peer_factory` to "
            "PeerEnsemble.from_pretrained to rebuild it."
        )
    model_cls = getattr(transformers, name, None) if _CLASS_NAME.match(str(name)) else None
    if not (isinstance(model_cls, type) and issubclass(model_cls, PreTrainedModel)):
        raise ValueError(f"peer {index}: {name!r} is not a transformers model class.")
    config = dict(config)
    model_type = config.pop("model_type")
    config = AutoConfig.for_model(model_type, **config)
    if entry.get("attn_implementation") is not None:
        config._attn_implementation = entry["attn_implementation"]
    return model_cls(config)

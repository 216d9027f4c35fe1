"""Mean-field Gaussian layers and the conversion of any model to a Bayesian neural network.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_extensions.validation import check_choice, check_positive

ESTIMATORS = ("reparameterization", "flipout")
PRIOR_MEANS = ("zero", "pretrained")


def rho_from_sigma(sigma: torch.Tensor | float, min_sigma: float = 1e-8) -> torch.Tensor:
    """Inverse softplus: ``rho`` with ``softplus(rho) = sigma`` (``sigma`` clamped at ``min_sigma``)."""
    # host: initialisation, converted to the parameter's device by the caller
    sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp_min(min_sigma)
    # log(expm1(s)) = s + log(1 - exp(-s)): finite for small and large s alike.
    return sigma + torch.log(-torch.expm1(-sigma))


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
        check_positive("prior_std", prior_std)
        check_choice("prior_mean", prior_mean, PRIOR_MEANS)
        check_choice("estimator", estimator, ESTIMATORS)
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
    if moped_delta is not None:
        check_positive("moped_delta", moped_delta)
    if moped_delta is not None and not init_from_pretrained:
        raise ValueError("`moped_delta` needs `init_from_pretrained=True` (sigma = delta |w|).")
    check_choice("prior_mean", prior_mean, PRIOR_MEANS)
    check_choice("estimator", estimator, ESTIMATORS)
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


def bayesian_layers(model: nn.Module) -> list[tuple[str, BayesianLayer]]:
    """``[(name, layer)]`` of the Gaussian layers of ``model``, in ``named_modules`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BayesianLayer)]

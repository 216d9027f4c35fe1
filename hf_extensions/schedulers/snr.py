"""The signal-to-noise (S2N) view of diffusion schedules and the generalized backward update.

Doan et al., "Connective Viewpoints of Signal-to-Noise Diffusion Models" (arXiv 2408.04221),
write every common diffusion model as a signal-to-noise model

    z_t = α(t) x + σ(t) ε,    SNR(t) = α(t)² / σ(t)²,    λ(t) = log(α(t) / σ(t)) = ½ log SNR(t)

(Sec. 2: VP/DDPM, VE/SMLD, EDM, VDM and flow matching are instances that differ only in how
α and σ depend on t). This module gives each family that view (:class:`VPSchedule` for every
diffusers beta schedule and zero-terminal-SNR rescaling, :class:`VESchedule`,
:class:`EDMSchedule`, :class:`FlowMatchingSchedule`), conversions between the usual model
targets (:func:`convert_prediction`), and the paper's backward family with one knob ρ:

    dz = [f z − (1 + ρ²)/2 · g² ∇ log p_t(z)] dt + ρ g dW̄,

which has the forward process's marginals for every ρ ≥ 0 (ρ = 0: the probability-flow ODE;
ρ = 1: the reverse SDE). Freezing the data prediction x̂0 over a step t → s (h = λ_s − λ_t > 0)
and integrating the linear SDE in λ exactly gives (:func:`s2n_coefficients`)

    z_s = α_s x̂0 + σ_s e^{−ρ²h} ε̂ + σ_s sqrt(1 − e^{−2ρ²h}) ξ,    ε̂ = (z_t − α_t x̂0) / σ_t.

Because the update depends on the schedule only through (α, σ), one sampler
(:func:`sample_s2n`) serves every family; in the coordinates z/α it depends on λ alone, so two
schedules sampled on the same λ grid give the same trajectory (a test checks it).

Departures: the paper has no official code; this module's update is the first-order
data-prediction discretisation above. It coincides with DDIM (ρ = 0 and ρ = 1 with eta = 1),
k-diffusion's first-order DPM++ SDE with eta = ρ², and diffusers' SA-Solver first-order
predictor with τ = ρ.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hf_extensions.validation import check_integer, check_positive, refuse

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "EDMSchedule",
    "FlowMatchingSchedule",
    "S2NSchedule",
    "S2NTrajectory",
    "VESchedule",
    "VPSchedule",
    "convert_prediction",
    "make_betas",
    "s2n_coefficients",
    "s2n_second_order_coefficient",
    "sample_s2n",
]

#: every beta schedule diffusers' VP schedulers accept (DDPM, DDIM, Heun, ... together).
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace", "exp")
#: model targets understood by :func:`convert_prediction`.
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")


# Mirrors the beta construction of diffusers DDPMScheduler.__init__ (tests/test_upstream_internals.py
# checks equality for every schedule against the installed diffusers).
def make_betas(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: Sequence[float] | np.ndarray | None = None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """The float32 betas a diffusers VP scheduler builds from the same config values.

    Args:
        num_train_timesteps (`int`, *optional*, defaults to `1000`):
            The number of training timesteps T: the length of the result.
        beta_start (`float`, *optional*, defaults to `0.0001`):
            The first β of the ``linear``, ``scaled_linear`` and ``sigmoid`` schedules.
        beta_end (`float`, *optional*, defaults to `0.02`):
            The last β of the ``linear``, ``scaled_linear`` and ``sigmoid`` schedules.
        beta_schedule (`str`, *optional*, defaults to `"linear"`):
            One of :data:`BETA_SCHEDULES`: ``linear`` / ``scaled_linear`` (linear in √β) /
            ``sigmoid`` as in ``DDPMScheduler``; ``squaredcos_cap_v2`` (the cosine schedule of
            Nichol & Dhariwal), ``laplace`` and ``exp`` through diffusers'
            ``betas_for_alpha_bar`` (these three ignore ``beta_start`` / ``beta_end``).
        trained_betas (`Sequence[float]` or `np.ndarray`, *optional*, defaults to `None`):
            The βs given directly; they replace the schedule (``num_train_timesteps``,
            ``beta_start``, ``beta_end`` and ``beta_schedule`` are then not used).
        rescale_betas_zero_snr (`bool`, *optional*, defaults to `False`):
            Rescale the result with diffusers' ``rescale_zero_terminal_snr`` (Lin et al. 2024,
            Algorithm 1), which makes SNR(T) = 0; applies to ``trained_betas`` too.

    Returns:
        `torch.Tensor`: the float32 βs, one per training timestep.

    Raises:
        ValueError: ``beta_schedule`` is not one of :data:`BETA_SCHEDULES` (and no
            ``trained_betas`` are given).
    """
    from diffusers.schedulers.scheduling_ddpm import (
        betas_for_alpha_bar,
        rescale_zero_terminal_snr,
    )

    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = (
            torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32)
            ** 2
        )
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps)
    elif beta_schedule in ("laplace", "exp"):
        betas = betas_for_alpha_bar(num_train_timesteps, alpha_transform_type=beta_schedule)
    elif beta_schedule == "sigmoid":
        grid = torch.linspace(-6, 6, num_train_timesteps)
        betas = torch.sigmoid(grid) * (beta_end - beta_start) + beta_start
    else:
        refuse("beta_schedule", f"one of {BETA_SCHEDULES}", beta_schedule)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


# ----------------------------------------------------------------------------- schedules


class S2NSchedule(ABC):
    """A signal-to-noise schedule z_t = α(t) x + σ(t) ε (Doan et al. 2024, Eq. 1).

    Subclasses give α(t) and σ(t); λ(t) = log α − log σ, SNR = e^{2λ} and the inverse
    t(λ) follow. Times are tensors (or numbers); results are float64 tensors.
    """

    #: short name of the model family.
    family: str = "s2n"

    @abstractmethod
    def alpha(self, t: Any) -> torch.Tensor:
        """Signal scale α(t)."""

    @abstractmethod
    def sigma(self, t: Any) -> torch.Tensor:
        """Noise scale σ(t)."""

    @abstractmethod
    def t_from_log_snr(self, log_snr: Any) -> torch.Tensor:
        """The time at which λ(t) equals ``log_snr`` (λ is decreasing in t)."""

    def log_snr(self, t: Any) -> torch.Tensor:
        """λ(t) = log(α/σ) = ½ log SNR(t)."""
        return torch.log(self.alpha(t)) - torch.log(self.sigma(t))

    def snr(self, t: Any) -> torch.Tensor:
        """SNR(t) = α² / σ²."""
        return (self.alpha(t) / self.sigma(t)) ** 2

    def ve_sigma(self, t: Any) -> torch.Tensor:
        """σ/α = e^{−λ}: the noise level of the equivalent variance-exploding model z/α."""
        return self.sigma(t) / self.alpha(t)

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, t: Any) -> torch.Tensor:
        """Forward marginal α(t) x + σ(t) ε, broadcast over a leading batch dimension."""
        alpha = _expand(self.alpha(t), x)
        sigma = _expand(self.sigma(t), x)
        return (alpha * x + sigma * noise).to(x.dtype)


def _as_tensor(t: Any) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def _expand(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    while value.dim() < like.dim():
        value = value.unsqueeze(-1)
    return value


class VPSchedule(S2NSchedule):
    """Variance-preserving (DDPM) schedules: α = sqrt(ᾱ_t), σ = sqrt(1 − ᾱ_t), α² + σ² = 1.

    ``alphas_cumprod`` is diffusers' ᾱ table indexed by the integer training timestep. Integer
    times read the table; fractional times interpolate λ linearly (as diffusers' DPM-Solver
    interpolates its sigmas). With zero-terminal-SNR rescaling ᾱ_T = 0, so λ_T = −∞.
    """

    family = "vp"

    def __init__(self, alphas_cumprod: torch.Tensor | Sequence[float]):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if alphas_cumprod.dim() != 1 or len(alphas_cumprod) < 2:
            raise ValueError("alphas_cumprod must be a 1-D table of at least 2 values.")
        if (alphas_cumprod < 0).any() or (alphas_cumprod >= 1).any():
            raise ValueError("alphas_cumprod must lie in [0, 1).")
        if (alphas_cumprod[1:] > alphas_cumprod[:-1]).any():
            raise ValueError("alphas_cumprod must be non-increasing in t.")
        self.alphas_cumprod = alphas_cumprod
        # log(0) = −inf for a zero-terminal-SNR table: λ_T = −∞ is the right value.
        self._log_snr_table = 0.5 * (torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod))

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None, **overrides) -> VPSchedule:
        """The schedule of a diffusers VP scheduler config (DDIM, DDPM, PNDM, Euler, ...)."""
        values = {**dict(config or {}), **overrides}
        keys = (
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "rescale_betas_zero_snr",
        )
        betas = make_betas(**{k: values[k] for k in keys if values.get(k) is not None})
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def log_snr(self, t: Any) -> torch.Tensor:
        t = _as_tensor(t)
        grid = torch.arange(self.num_train_timesteps, dtype=torch.float64)
        if torch.equal(t, t.round()):
            return self._log_snr_table[t.long().clamp(0, self.num_train_timesteps - 1)]
        return torch.from_numpy(
            np.interp(t.numpy(), grid.numpy(), self._log_snr_table.numpy())
        ).reshape(t.shape)

    def alpha(self, t: Any) -> torch.Tensor:
        return torch.sigmoid(2 * self.log_snr(t)).sqrt()

    def sigma(self, t: Any) -> torch.Tensor:
        return torch.sigmoid(-2 * self.log_snr(t)).sqrt()

    def t_from_log_snr(self, log_snr: Any) -> torch.Tensor:
        log_snr = _as_tensor(log_snr)
        table = self._log_snr_table.numpy()
        finite = np.isfinite(table)
        # np.interp wants increasing abscissae: λ decreases in t, so read the table backwards.
        lam, times = table[finite][::-1], np.arange(len(table))[finite][::-1].astype(np.float64)
        return torch.from_numpy(np.interp(log_snr.numpy(), lam, times)).reshape(log_snr.shape)


class VESchedule(S2NSchedule):
    """Variance-exploding (SMLD, Song et al. 2021): α = 1, σ(t) = σ_min (σ_max/σ_min)^t, t ∈ [0, 1]."""

    family = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}."
            )
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def alpha(self, t: Any) -> torch.Tensor:
        return torch.ones_like(_as_tensor(t))

    def sigma(self, t: Any) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** _as_tensor(t)

    def t_from_log_snr(self, log_snr: Any) -> torch.Tensor:
        return (-_as_tensor(log_snr) - math.log(self.sigma_min)) / math.log(
            self.sigma_max / self.sigma_min
        )


class EDMSchedule(S2NSchedule):
    """EDM (Karras et al. 2022): α = 1 and the time is the noise level itself, σ(t) = t.

    :meth:`karras_sigmas` gives EDM's sampling grid; its exponent (EDM's ρ = 7) is named
    ``karras_exponent`` here so that it is not confused with the stochasticity ρ of the
    backward family. An EDM network D(z; σ) is already a data prediction (``"sample"``).
    """

    family = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}."
            )
        check_positive("sigma_data", sigma_data)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def alpha(self, t: Any) -> torch.Tensor:
        return torch.ones_like(_as_tensor(t))

    def sigma(self, t: Any) -> torch.Tensor:
        return _as_tensor(t)

    def t_from_log_snr(self, log_snr: Any) -> torch.Tensor:
        return torch.exp(-_as_tensor(log_snr))

    def karras_sigmas(self, num_steps: int, karras_exponent: float = 7.0) -> torch.Tensor:
        """EDM Eq. 5: (σ_max^{1/p} + i/(N−1) (σ_min^{1/p} − σ_max^{1/p}))^p, i = 0..N−1."""
        check_integer("num_steps", num_steps, low=2)
        ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / karras_exponent), self.sigma_max ** (1 / karras_exponent)
        return (hi + ramp * (lo - hi)) ** karras_exponent


class FlowMatchingSchedule(S2NSchedule):
    """Rectified flow / flow matching: α = 1 − t, σ = t (t ∈ [0, 1]), optionally time-shifted.

    ``shift`` applies SD3's shift t' = s t / (1 + (s − 1) t) before α and σ are read. A
    velocity network predicts v = ε − x (``"flow_prediction"`` in :func:`convert_prediction`).
    """

    family = "flow"

    def __init__(self, shift: float = 1.0):
        check_positive("shift", shift)
        self.shift = float(shift)

    def _shifted(self, t: Any) -> torch.Tensor:
        t = _as_tensor(t)
        return self.shift * t / (1 + (self.shift - 1) * t)

    def alpha(self, t: Any) -> torch.Tensor:
        return 1 - self._shifted(t)

    def sigma(self, t: Any) -> torch.Tensor:
        return self._shifted(t)

    def t_from_log_snr(self, log_snr: Any) -> torch.Tensor:
        shifted = torch.sigmoid(-_as_tensor(log_snr))  # α/σ = e^λ with α + σ = 1
        return shifted / (self.shift - (self.shift - 1) * shifted)


# ----------------------------------------------------------------------------- conversions


def convert_prediction(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha: Any,
    sigma: Any,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Data and noise predictions (x̂0, ε̂) from a network output, for z = α x + σ ε.

    ``epsilon``: ε̂ = output; ``sample``: x̂0 = output; ``v_prediction`` (Salimans & Ho 2022,
    v = α ε − σ x, for α² + σ² = 1); ``flow_prediction``: v = ε − x (rectified flow), valid
    for any α, σ: x̂0 = (z − σ v)/(α + σ). The formulas for the first three are DDIM's.
    """
    if prediction_type == "epsilon":
        x0 = (sample - sigma * model_output) / alpha
        return x0, model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha * model_output) / sigma
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
    if prediction_type == "flow_prediction":
        x0 = (sample - sigma * model_output) / (alpha + sigma)
        return x0, model_output + x0
    refuse("prediction_type", f"one of {PREDICTION_TYPES}", prediction_type)


# ----------------------------------------------------------------------------- the update


def s2n_coefficients(
    alpha_t: float,
    sigma_t: float,
    alpha_s: float,
    sigma_s: float,
    rho: float,
    s_noise: float = 1.0,
) -> tuple[float, float, float]:
    """(c_x0, c_eps, c_noise) of z_s = c_x0 x̂0 + c_eps ε̂ + c_noise ξ (Doan et al. 2024).

    The exact solution over t → s of the backward equation with parameter ρ when the data
    prediction is frozen: c_x0 = α_s, c_eps = σ_s e^{−ρ²h}, c_noise = s_noise σ_s
    sqrt(1 − e^{−2ρ²h}), with e^{−2h} = SNR_t / SNR_s computed from α, σ directly, so that
    SNR_t = 0 (zero terminal SNR) and σ_s = 0 (the final clean step) need no special case.

    Args:
        alpha_t (`float`):
            Signal scale α at the current time t.
        sigma_t (`float`):
            Noise scale σ at t; must be > 0.
        alpha_s (`float`):
            Signal scale α at the next time s; must be > 0.
        sigma_s (`float`):
            Noise scale σ at s (0 for the final clean step).
        rho (`float`):
            ρ ≥ 0 of the backward equation: 0 is the probability-flow ODE (DDIM), 1 the reverse
            SDE.
        s_noise (`float`, *optional*, defaults to `1.0`):
            Scale of the injected noise (EDM's S_noise); 1 keeps the marginals.

    Returns:
        `tuple[float, float, float]`: ``(c_x0, c_eps, c_noise)``.

    Raises:
        ValueError: ``rho < 0``, ``sigma_t`` or ``alpha_s`` is 0, or the step lowers the SNR
            (SNR_t > SNR_s).
    """
    check_positive("rho", rho, allow_zero=True)
    denominator = (sigma_t * alpha_s) ** 2
    if denominator <= 0:
        raise ValueError(
            f"a step needs sigma_t > 0 and alpha_s > 0 (got sigma_t={sigma_t}, alpha_s={alpha_s})."
        )
    ratio = (alpha_t * sigma_s) ** 2 / denominator  # SNR_t / SNR_s = e^{−2h} ∈ [0, 1]
    if ratio > 1 + 1e-12:
        raise ValueError(f"a backward step must increase the SNR (SNR_t/SNR_s = {ratio:.6g}).")
    ratio = min(ratio, 1.0)
    if rho == 0:
        return alpha_s, sigma_s, 0.0
    if ratio == 0:
        return alpha_s, 0.0, s_noise * sigma_s
    log_ratio = math.log(ratio)  # −2h
    decay = math.exp(0.5 * rho**2 * log_ratio)  # e^{−ρ²h}
    return alpha_s, sigma_s * decay, s_noise * sigma_s * math.sqrt(-math.expm1(rho**2 * log_ratio))


def s2n_second_order_coefficient(h: float, h_previous: float, rho: float) -> float:
    """Weight of (x̂0_t − x̂0_prev) in the 2M update, to be multiplied by α_s.

    Extrapolating x̂0 linearly in λ through the last two model evaluations and integrating the
    backward equation exactly gives the extra term α_s (h/h_prev) (1 − (1 − e^{−κh})/(κh)) ·
    (x̂0_t − x̂0_prev) with κ = 1 + ρ². ρ = 0 and ρ = 1 are diffusers' DPM-Solver++(2M) and
    SDE-DPM-Solver++(2M) with ``solver_type="heun"`` (k-diffusion's ``sample_dpmpp_2m_sde``
    with eta = ρ²).
    """
    if not (h > 0 and h_previous > 0) or math.isinf(h):
        return 0.0
    kh = (1 + rho**2) * h
    return (h / h_previous) * (1 + math.expm1(-kh) / kh)


# ----------------------------------------------------------------------------- a sampler


Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class S2NTrajectory:
    """What :func:`sample_s2n` returns: the final sample and every intermediate z."""

    sample: torch.Tensor
    trajectory: list[torch.Tensor]


def sample_s2n(
    denoiser: Denoiser,
    schedule: S2NSchedule,
    times: Sequence[float] | torch.Tensor,
    noise: torch.Tensor,
    rho: float = 0.0,
    *,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    step_noises: Sequence[torch.Tensor] | None = None,
    final_denoise: bool = True,
) -> S2NTrajectory:
    """Sample any S2N model with the generalized backward update (one loop for all families).

    Args:
        denoiser: ``denoiser(z, alpha, sigma) -> x̂0`` (a data prediction; wrap other targets
            with :func:`convert_prediction`). ``alpha`` and ``sigma`` are 0-d tensors.
        schedule: the model's α(t), σ(t).
        times: decreasing times t_0 > t_1 > ... (λ increasing).
        noise: ε of the initial state, z_{t_0} = σ(t_0) · noise (the usual prior
            approximation, which ignores the α(t_0) x term).
        rho: the backward family's parameter (0: probability-flow ODE, 1: reverse SDE).
        step_noises: the ξ of each step (else drawn with ``generator``).
        final_denoise: after the last time, return x̂0 at that time (the step to σ = 0).
    """
    times = torch.as_tensor(times, dtype=torch.float64)
    if times.dim() != 1 or len(times) < 1:
        raise ValueError("times must be a non-empty 1-D sequence.")
    alphas, sigmas = schedule.alpha(times), schedule.sigma(times)
    z = (sigmas[0] * noise.to(torch.float64)).to(noise.dtype)
    path = [z]
    for i in range(len(times)):
        alpha_t, sigma_t = alphas[i], sigmas[i]
        x0 = denoiser(z, alpha_t, sigma_t)
        if i == len(times) - 1:
            if final_denoise:
                z = x0
                path.append(z)
            break
        alpha_s, sigma_s = alphas[i + 1], sigmas[i + 1]
        c_x0, c_eps, c_noise = s2n_coefficients(
            float(alpha_t), float(sigma_t), float(alpha_s), float(sigma_s), rho, s_noise
        )
        eps = (z - float(alpha_t) * x0) / float(sigma_t)
        z = c_x0 * x0 + c_eps * eps
        if c_noise > 0:
            if step_noises is not None:
                xi = step_noises[i]
            else:
                # drawn on the generator's device (a CPU generator gives the same draws on
                # every device), then moved to the sample's
                home = generator.device if generator is not None else z.device
                xi = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=home)
                xi = xi.to(z.device)
            z = z + c_noise * xi
        path.append(z)
    return S2NTrajectory(sample=z, trajectory=path)

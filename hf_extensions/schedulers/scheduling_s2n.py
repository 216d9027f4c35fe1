"""``S2NGeneralizedScheduler``: the generalized backward equation of signal-to-noise diffusion.

Doan et al., "Connective Viewpoints of Signal-to-Noise Diffusion Models" (arXiv 2408.04221)
show that for every ρ ≥ 0 the backward SDE

    dz = [f z − (1 + ρ²)/2 · g² ∇ log p_t(z)] dt + ρ g dW̄

has the forward process's marginals. Freezing the data prediction x̂0 over a step t → s, with
λ = log(α/σ) and h = λ_s − λ_t, the step is solved exactly by

    z_s = α_s x̂0 + σ_s e^{−ρ²h} ε̂ + s_noise · σ_s sqrt(1 − e^{−2ρ²h}) ξ,    ξ ~ N(0, I).

This scheduler is that update on diffusers' discrete variance-preserving schedules. It takes
DDIM's config keys and defaults (so ``from_config`` works from DDIM / PNDM / Euler / DPM-Solver
configs of VP models) and adds ``rho``, ``s_noise``, the noise window ``rho_t_min`` /
``rho_t_max``, ``solver_order`` and ``prev_timestep_rule`` (the class docstring's ``Args:``
says what each does).

Departures from the paper: the paper's Corollary 1 adds two parameters γ and δ to the backward
family; their exact formula could not be established offline, so they are not implemented
(γ = δ = 0 is what this scheduler does). ``eta``: pipelines pass their ``eta`` argument to
``step`` when its signature has one; this scheduler accepts it with DDIM's meaning but only the
value 0 (every pipeline's default), and refuses any other value instead of silently ignoring it:
the stochasticity knob is ``config.rho`` (ρ = 1 is DDIM's eta = 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from hf_extensions.schedulers.snr import (
    BETA_SCHEDULES,
    VPSchedule,
    make_betas,
    s2n_coefficients,
    s2n_second_order_coefficient,
)
from hf_extensions.validation import (
    check_bool,
    check_choice,
    check_finite_tensor,
    check_integer,
    check_positive,
    check_range,
    refuse,
)

__all__ = ["S2NGeneralizedScheduler", "S2NSchedulerOutput", "run_denoising_loop"]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREV_TIMESTEP_RULES = ("ddim", "next")
SOLVER_ORDERS = (1, 2)
#: Most training timesteps a schedule may have (VP models use 1000 to 4000; the tables cost
#: memory linear in T, so a mistyped T is refused before they are built).
MAX_TRAIN_TIMESTEPS = 1_000_000


@dataclass
class S2NSchedulerOutput(BaseOutput):
    """Output of :meth:`S2NGeneralizedScheduler.step` (the fields of ``DDIMSchedulerOutput``).

    Args:
        prev_sample: z_s, the input of the next model call.
        pred_original_sample: x̂0 at the current step (after clipping / thresholding).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@dataclass(frozen=True)
class _StepPlan:
    """Everything a step t → s needs that does not depend on the sample."""

    index: int | None
    prev_timestep: int
    alpha_t: float
    sigma_t: float
    alpha_s: float
    sigma_s: float
    lambda_t: float
    lambda_s: float
    rho: float
    c_eps: float
    c_noise: float


def _checked_settings(**settings: Any) -> dict[str, Any]:
    """The scheduler's arguments checked (each error names its argument) and as plain Python
    values (a numpy scalar would make ``scheduler_config.json`` unwritable)."""
    out = dict(settings)
    for name, allowed in (
        ("prediction_type", PREDICTION_TYPES),
        ("timestep_spacing", TIMESTEP_SPACINGS),
        ("prev_timestep_rule", PREV_TIMESTEP_RULES),
        ("solver_order", SOLVER_ORDERS),
    ):
        out[name] = check_choice(name, settings[name], allowed)
    for name in ("rho", "s_noise"):
        out[name] = check_positive(name, settings[name], allow_zero=True)
    out["rho_t_min"] = check_integer("rho_t_min", settings["rho_t_min"], low=0)
    if settings["rho_t_max"] is not None:
        out["rho_t_max"] = check_integer("rho_t_max", settings["rho_t_max"], low=out["rho_t_min"])
    out["num_train_timesteps"] = check_integer(
        "num_train_timesteps", settings["num_train_timesteps"], low=2, high=MAX_TRAIN_TIMESTEPS
    )
    for name in ("clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr"):
        out[name] = check_bool(name, settings[name])
    out["steps_offset"] = check_integer(  # timestep 0 + offset must be a training timestep
        "steps_offset", settings["steps_offset"], low=0, high=out["num_train_timesteps"] - 1
    )
    out["dynamic_thresholding_ratio"] = check_range(
        "dynamic_thresholding_ratio",
        settings["dynamic_thresholding_ratio"],
        low=0.0,
        low_open=True,
        high=1.0,
    )
    for name in ("beta_start", "beta_end"):  # checked with trained_betas too: saved all the same
        out[name] = check_range(name, settings[name], low=0.0, high=1.0)
    out["beta_schedule"] = check_choice("beta_schedule", settings["beta_schedule"], BETA_SCHEDULES)
    if settings["trained_betas"] is not None:
        out["trained_betas"] = _checked_trained_betas(
            settings["trained_betas"], out["num_train_timesteps"]
        )
    for name in ("clip_sample_range", "sample_max_value"):
        out[name] = check_positive(name, settings[name])
    return out


def _check_betas(betas: torch.Tensor, settings: dict[str, Any]) -> None:
    """A VP schedule: β_0 > 0 (else ᾱ_0 = 1, σ_0 = 0 and λ_0 = inf) and β_t < 1 before the last
    timestep (a β of 1 zeroes the signal of every later timestep; 0 at the last one alone is a
    zero terminal SNR)."""
    given = settings["trained_betas"] is not None
    if not betas[0] > 0:
        name = "trained_betas" if given else "beta_start"
        refuse(
            name,
            "a schedule whose first beta is > 0 (with beta 0 the first timestep has no noise "
            "and an infinite log-SNR)",
            f"first beta {float(betas[0])}" if given else settings["beta_start"],
        )
    if bool((betas[:-1] >= 1).any()):
        name = "trained_betas" if given else "beta_start"
        refuse(
            name,
            "a schedule whose betas are < 1 before the last timestep (a beta of 1 zeroes the "
            "signal of every later timestep; `beta_end` may reach 1)",
            f"first beta 1 at timestep {int((betas >= 1).nonzero()[0])}"
            if given
            else settings["beta_start"],
        )


def _checked_trained_betas(trained_betas: Any, num_train_timesteps: int) -> list[float]:
    """One β in [0, 1] per training timestep (a shorter table fails deep inside a step)."""
    if isinstance(trained_betas, (str, bytes, dict)) or np.ndim(trained_betas) != 1:
        refuse("trained_betas", "None or a 1-D list of betas", trained_betas)
    try:
        betas = np.asarray(trained_betas, dtype=np.float64)
    except (TypeError, ValueError):
        refuse("trained_betas", "None or a 1-D list of betas (numbers)", trained_betas)
    check_finite_tensor("trained_betas", betas)
    if len(betas) != num_train_timesteps:
        refuse(
            "trained_betas",
            f"one beta per training timestep ({num_train_timesteps}, `num_train_timesteps`)",
            f"{len(betas)} betas",
        )
    if betas.min() < 0 or betas.max() > 1:
        refuse("trained_betas", "betas in [0, 1]", f"betas in [{betas.min()}, {betas.max()}]")
    # host: config values (the betas list diffusers serialises)
    return betas.tolist()


class S2NGeneralizedScheduler(SchedulerMixin, ConfigMixin):
    """Generalized backward scheduler of signal-to-noise diffusion (Doan et al. 2024, Sec. 3).

    Use it wherever a diffusers VP scheduler is used::

        pipe.scheduler = S2NGeneralizedScheduler.from_config(pipe.scheduler.config, rho=0.5)

    The parameters up to ``rescale_betas_zero_snr`` are ``DDIMScheduler``'s, with its defaults
    and meaning; the last six are the S2N ones (module docstring for the update).

    Args:
        num_train_timesteps (`int`, *optional*, defaults to `1000`):
            The number of diffusion steps the model was trained with (T); at least 2.
        beta_start (`float`, *optional*, defaults to `0.0001`):
            The first β of the ``linear``, ``scaled_linear`` and ``sigmoid`` schedules.
        beta_end (`float`, *optional*, defaults to `0.02`):
            The last β of the ``linear``, ``scaled_linear`` and ``sigmoid`` schedules.
        beta_schedule (`str`, *optional*, defaults to `"linear"`):
            How the βs are built from ``beta_start`` / ``beta_end``: any of
            :data:`hf_extensions.schedulers.snr.BETA_SCHEDULES` (``linear``, ``scaled_linear``,
            ``squaredcos_cap_v2``, ``sigmoid``, ``laplace``, ``exp``; see
            :func:`hf_extensions.schedulers.snr.make_betas`).
        trained_betas (`np.ndarray` or `list[float]`, *optional*, defaults to `None`):
            The βs given directly (one per training timestep), in place of ``beta_start``,
            ``beta_end`` and ``beta_schedule``.
        clip_sample (`bool`, *optional*, defaults to `True`):
            Clamp x̂0 to ``[-clip_sample_range, clip_sample_range]`` (unless ``thresholding``).
        set_alpha_to_one (`bool`, *optional*, defaults to `True`):
            ᾱ of the step past timestep 0 (the final step): 1 (a clean sample) if `True`, else
            ᾱ at timestep 0.
        steps_offset (`int`, *optional*, defaults to `0`):
            Added to every timestep of the ``leading`` spacing (Stable Diffusion uses 1).
        prediction_type (`str`, *optional*, defaults to `"epsilon"`):
            What the model predicts: ``epsilon`` (the noise), ``sample`` (x0) or
            ``v_prediction`` (v = α ε − σ x, Salimans & Ho 2022).
        thresholding (`bool`, *optional*, defaults to `False`):
            Dynamic thresholding of x̂0 (Saharia et al. 2022): per sample, s = the
            ``dynamic_thresholding_ratio`` quantile of |x̂0| clamped to ``[1, sample_max_value]``;
            x̂0 is clamped to [−s, s] and divided by s. Takes the place of ``clip_sample``.
        dynamic_thresholding_ratio (`float`, *optional*, defaults to `0.995`):
            The quantile of ``thresholding``, in (0, 1].
        clip_sample_range (`float`, *optional*, defaults to `1.0`):
            The bound of ``clip_sample``.
        sample_max_value (`float`, *optional*, defaults to `1.0`):
            The largest threshold s of ``thresholding``.
        timestep_spacing (`str`, *optional*, defaults to `"leading"`):
            How ``set_timesteps(n)`` spaces n timesteps over the T training ones, as DDIM does
            (Lin et al. 2024, Table 2): ``leading``, ``trailing`` or ``linspace``.
        rescale_betas_zero_snr (`bool`, *optional*, defaults to `False`):
            Rescale the βs to a zero terminal SNR (Lin et al. 2024, Algorithm 1); an
            ``epsilon`` model then cannot step from timestep T − 1 (the first timestep of
            ``trailing`` and ``linspace``): use ``v_prediction`` or ``sample`` there.
        rho (`float`, *optional*, defaults to `0.0`):
            ρ ≥ 0 of the backward equation: 0 is DDIM with eta 0 (the probability-flow ODE); 1
            is DDIM with eta 1 given the same noise (the reverse SDE); values in between and
            above interpolate and extrapolate. Equivalent to k-diffusion's first-order DPM++ SDE
            with eta = ρ² and diffusers' SA-Solver first-order predictor with τ = ρ, as one
            serialisable number instead of a callable.
        s_noise (`float`, *optional*, defaults to `1.0`):
            Scale (≥ 0) of the injected noise (EDM's S_noise); 1 keeps the marginals.
        rho_t_min (`int`, *optional*, defaults to `0`):
            The smallest timestep (the current t of a step, in timestep units) at which ρ
            applies; steps outside ``[rho_t_min, rho_t_max]`` are deterministic (EDM's S_tmin).
        rho_t_max (`int`, *optional*, defaults to `None`):
            The largest such timestep, inclusive (EDM's S_tmax); `None`: no upper bound. At
            least ``rho_t_min``.
        solver_order (`int`, *optional*, defaults to `1`):
            1 is the first-order update; 2 adds the multistep correction of an x̂0 linear in λ
            (DPM-Solver++(2M) at ρ = 0 and SDE-DPM-Solver++(2M) at ρ = 1,
            ``solver_type="heun"``).
        prev_timestep_rule (`str`, *optional*, defaults to `"ddim"`):
            ``"ddim"`` steps from t to t − T // n exactly as ``DDIMScheduler`` does (so ρ = 0
            reproduces it for every spacing, including its off-grid steps with ``linspace`` /
            ``trailing`` when n does not divide T); ``"next"`` steps to the next entry of
            ``timesteps`` (as DDPM and DPM-Solver do). Custom ``timesteps`` always use
            ``"next"``.

    Raises:
        ValueError: a choice outside its allowed values, a negative or non-finite ``rho`` /
            ``s_noise``, a negative ``rho_t_min`` or ``steps_offset``, ``rho_t_max <
            rho_t_min``, ``num_train_timesteps`` outside [2, 1000000], a flag that is not a
            bool, ``dynamic_thresholding_ratio`` outside (0, 1], a ``beta_start`` /
            ``beta_end`` outside [0, 1], ``trained_betas`` that are not one finite β in [0, 1]
            per training timestep, a schedule whose first β is 0 or with a β of 1 before the
            last timestep, or a ``clip_sample_range`` / ``sample_max_value`` that is not a
            finite number > 0 (NaN and ±inf are refused). The config holds the checked values
            as plain Python numbers.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading",
        rescale_betas_zero_snr: bool = False,
        rho: float = 0.0,
        s_noise: float = 1.0,
        rho_t_min: int = 0,
        rho_t_max: int | None = None,
        solver_order: int = 1,
        prev_timestep_rule: Literal["ddim", "next"] = "ddim",
    ):
        settings = _checked_settings(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            clip_sample=clip_sample,
            set_alpha_to_one=set_alpha_to_one,
            steps_offset=steps_offset,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
            rho=rho,
            s_noise=s_noise,
            rho_t_min=rho_t_min,
            rho_t_max=rho_t_max,
            solver_order=solver_order,
            prev_timestep_rule=prev_timestep_rule,
        )
        self.register_to_config(**settings)  # the checked, plain values (what the JSON saves)
        num_train_timesteps = settings["num_train_timesteps"]
        set_alpha_to_one = settings["set_alpha_to_one"]
        self.betas = make_betas(
            num_train_timesteps,
            settings["beta_start"],
            settings["beta_end"],
            settings["beta_schedule"],
            settings["trained_betas"],
            settings["rescale_betas_zero_snr"],
        )
        _check_betas(self.betas, settings)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # host: schedule tables on the host, as diffusers keeps them
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        #: the S2N view (α, σ, λ, SNR) of this schedule.
        self.schedule = VPSchedule(self.alphas_cumprod)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.custom_timesteps = False
        # host: as above
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._plans: dict[int, _StepPlan] = {}
        self._previous: tuple[int, torch.Tensor, float] | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """``ConfigMixin.from_config``, refusing configs of models that are not VP.

        A flow-matching or EDM scheduler's config has no beta schedule: taking DDIM's default
        betas instead would sample the model with the wrong α(t), σ(t) (and EDM's ``rho`` is
        the Karras exponent 7, not this ρ). Keys shared with DPM-Solver / DEIS / UniPC configs
        keep their meaning: ``solver_order=2`` selects the 2M update (3 is refused). Flow-matching
        pipelines take :class:`~hf_extensions.schedulers.S2NFlowMatchScheduler`; EDM models are
        sampled with :func:`~hf_extensions.schedulers.sample_s2n` and ``EDMSchedule``.

        ``clip_sample``: a config without the key comes from a scheduler that never clips x̂0
        (Euler, Heun, LMS, DPM-Solver, UniPC, DEIS, PNDM; every scheduler that clips saves the
        key), so it defaults to `False` there instead of DDIM's `True` (which would clamp the
        latents of a latent-diffusion model to [-1, 1] at every step). An empty config keeps
        DDIM's defaults; an explicit ``clip_sample=...`` keyword wins.
        """
        values = dict(config or {}) if not isinstance(config, str) else {}
        class_name = str(values.get("_class_name", ""))
        if (
            class_name.startswith(("FlowMatch", "EDM", "CMStochastic", "CosineDPM"))
            or {"shift", "sigma_data"} & set(values)  # flow matching; EDM / consistency
            or values.get("use_flow_sigmas")
            or values.get("prediction_type") == "flow_prediction"
        ):
            raise ValueError(
                f"config of {class_name or 'a non-VP scheduler'} is not a variance-preserving "
                "beta schedule; S2NGeneralizedScheduler samples VP models (allowed: configs "
                "with beta_start/beta_end/beta_schedule such as DDIM, DDPM, PNDM, Euler, "
                "DPM-Solver). Fix: for flow matching use hf_extensions.schedulers."
                "S2NFlowMatchScheduler.from_config(...) (a pipeline scheduler); for EDM, "
                "hf_extensions.schedulers.sample_s2n with EDMSchedule."
            )
        if values and "clip_sample" not in values and "clip_sample" not in kwargs:
            kwargs["clip_sample"] = False  # the source scheduler does not clip (docstring)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # ------------------------------------------------------------------ diffusers API

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """VP models take z_t unscaled (kept for interchangeability with Euler-type schedulers)."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """Choose the sampling timesteps: ``num_inference_steps`` spaced by ``timestep_spacing``
        (DDIM's rules, Lin et al. 2024 Table 2), or explicit decreasing ``timesteps``."""
        num_train = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of `num_inference_steps` or `timesteps`.")
        if timesteps is not None:
            values = np.asarray(
                # host: user-given timesteps, validated on the host at set_timesteps
                timesteps.cpu() if isinstance(timesteps, torch.Tensor) else timesteps
            )
            if values.ndim != 1 or len(values) < 1:
                raise ValueError("timesteps must be a non-empty 1-D sequence of integers.")
            if not np.all(values == np.round(values)):
                raise ValueError(f"timesteps must be integers, got {values.tolist()}.")
            values = values.astype(np.int64)
            if np.any(np.diff(values) >= 0):
                raise ValueError(f"timesteps must be strictly decreasing, got {values.tolist()}.")
            if values[0] >= num_train or values[-1] < 0:
                raise ValueError(
                    f"timesteps must lie in [0, {num_train - 1}] (num_train_timesteps), "
                    f"got {values.tolist()}."
                )
            self.custom_timesteps = True
            self.num_inference_steps = len(values)
        else:
            if not isinstance(num_inference_steps, (int, np.integer)) or not (
                1 <= num_inference_steps <= num_train
            ):
                raise ValueError(
                    f"num_inference_steps={num_inference_steps!r} must be an integer in "
                    f"[1, {num_train}] (num_train_timesteps)."
                )
            self.custom_timesteps = False
            self.num_inference_steps = int(num_inference_steps)
            values = self._spaced_timesteps(self.num_inference_steps)
            if values[0] >= num_train:  # leading spacing shifted by steps_offset
                raise ValueError(
                    f"`steps_offset`={self.config.steps_offset} with num_inference_steps="
                    f"{num_inference_steps} gives timestep {int(values[0])}, past the last "
                    f"training timestep {num_train - 1}: lower `steps_offset` or use "
                    "timestep_spacing='trailing'."
                )
        self.timesteps = torch.from_numpy(values).to(device)
        self._plans = self._plan_steps(values)
        self._previous = None

    # Mirrors diffusers DDIMScheduler.set_timesteps (timestep_spacing "linspace" / "leading" /
    # "trailing"); written here, kept equal by tests/test_s2n_scheduler.py (DDIM timesteps).
    def _spaced_timesteps(self, n: int) -> np.ndarray:
        num_train = self.config.num_train_timesteps
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            return np.linspace(0, num_train - 1, n).round()[::-1].astype(np.int64)
        if spacing == "leading":
            ratio = num_train // n
            return (np.arange(n) * ratio).round()[::-1].astype(np.int64) + self.config.steps_offset
        ratio = num_train / n  # trailing
        return np.round(np.arange(num_train, 0, -ratio)).astype(np.int64) - 1

    def _prev_timestep(self, timestep: int, index: int | None, values: np.ndarray | None) -> int:
        if self.config.prev_timestep_rule == "ddim" and not self.custom_timesteps:
            return timestep - self.config.num_train_timesteps // self.num_inference_steps
        if index is None:
            raise ValueError(
                f"timestep {timestep} is not one of the scheduler's timesteps; with "
                "prev_timestep_rule='next' or custom timesteps, step only at self.timesteps."
            )
        return int(values[index + 1]) if index + 1 < len(values) else -1

    def _plan_steps(self, values: np.ndarray) -> dict[int, _StepPlan]:
        """Precompute each step's coefficients (the step itself is a few tensor operations)."""
        return {
            int(t): self._plan(int(t), i, self._prev_timestep(int(t), i, values))
            for i, t in enumerate(values)
        }

    def _alpha_bar(self, timestep: int) -> torch.Tensor:
        if timestep < 0:
            return self.final_alpha_cumprod
        return self.alphas_cumprod[timestep]

    def _plan(self, timestep: int, index: int | None, prev_timestep: int) -> _StepPlan:
        # α and σ are read exactly as DDIMScheduler computes them (float32 powers), so that
        # ρ = 0 is the same arithmetic. The noise coefficients of ρ > 0 are computed in float64
        # from the same ᾱ: 1 − SNR_t/SNR_s cancels digits, and float32-rounded α, σ would cost
        # about 1e-6 relative there.
        bar_t, bar_s = self._alpha_bar(timestep), self._alpha_bar(prev_timestep)
        alpha_t, sigma_t = float(bar_t**0.5), float((1 - bar_t) ** 0.5)
        alpha_s, sigma_s = float(bar_s**0.5), float((1 - bar_s) ** 0.5)
        config = self.config
        in_window = timestep >= config.rho_t_min and (
            config.rho_t_max is None or timestep <= config.rho_t_max
        )
        rho = float(config.rho) if in_window else 0.0
        if rho == 0:
            c_eps, c_noise = sigma_s, 0.0
        else:
            b_t, b_s = float(bar_t), float(bar_s)
            _, c_eps, c_noise = s2n_coefficients(
                math.sqrt(b_t), math.sqrt(1 - b_t), math.sqrt(b_s), math.sqrt(1 - b_s), rho
            )
        return _StepPlan(
            index=index,
            prev_timestep=prev_timestep,
            alpha_t=alpha_t,
            sigma_t=sigma_t,
            alpha_s=alpha_s,
            sigma_s=sigma_s,
            lambda_t=_log_snr(float(bar_t)),
            lambda_s=_log_snr(float(bar_s)),
            rho=rho,
            c_eps=c_eps,
            c_noise=config.s_noise * c_noise,
        )

    # Mirrors diffusers DDIMScheduler._threshold_sample (test_clipping_and_thresholding_follow_ddim).
    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Saharia et al. 2022, Imagen Sec. 2.3), as in DDIM.

        Per sample, s = the ``dynamic_thresholding_ratio`` quantile of |x̂0|, clamped to
        [1, ``sample_max_value``]; x̂0 is clamped to [−s, s] and divided by s.
        """
        dtype = sample.dtype
        flat = sample.reshape(sample.shape[0], -1)
        if dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1, max=self.config.sample_max_value).unsqueeze(1)
        return (flat.clamp(-s, s) / s).reshape(sample.shape).to(dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> S2NSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One step t → s of the generalized backward equation (module docstring).

        Args:
            model_output: the network's output (a ``prediction_type`` target) at ``timestep``.
            timestep: the current discrete timestep t.
            sample: z_t.
            eta: DDIM's eta, accepted so that a pipeline's ``eta`` is not silently dropped;
                only 0 is allowed (set ``rho`` in the config: ρ = 1 is DDIM's eta = 1).
            generator: draws ξ when ρ > 0 for this step (as ``DDIMScheduler`` does for eta > 0).
            variance_noise: ξ given directly (not together with ``generator``).
            return_dict: return :class:`S2NSchedulerOutput`, else ``(prev_sample, x̂0)``.
        """
        if self.num_inference_steps is None:
            raise ValueError("call `set_timesteps` before `step`.")
        if eta != 0:
            raise ValueError(
                f"eta={eta!r}: S2NGeneralizedScheduler has no DDIM eta (allowed: 0); its "
                "stochasticity is config.rho (rho=1 equals DDIM eta=1). Use "
                "S2NGeneralizedScheduler.from_config(pipe.scheduler.config, rho=...)."
            )
        if variance_noise is not None and generator is not None:
            raise ValueError("pass either `generator` or `variance_noise`, not both.")
        t = int(timestep)
        plan = self._plans.get(t)
        if plan is None:
            plan = self._plan(t, None, self._prev_timestep(t, None, None))

        # 1. data and noise predictions (DDIM's formulas).
        prediction_type = self.config.prediction_type
        alpha_t, sigma_t = plan.alpha_t, plan.sigma_t
        if prediction_type == "epsilon":
            if alpha_t == 0:
                raise ValueError(
                    f"timestep {t} has SNR 0 (a zero terminal SNR: `rescale_betas_zero_snr` or a "
                    "last beta of 1): an epsilon prediction carries no information on x0 there. "
                    "Use `prediction_type` v_prediction or sample, or a `timestep_spacing` that "
                    "does not start at the last timestep."
                )
            pred_original_sample = (sample - sigma_t * model_output) / alpha_t
            pred_epsilon = model_output
        elif prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - alpha_t * pred_original_sample) / sigma_t
        else:  # v_prediction
            pred_original_sample = alpha_t * sample - sigma_t * model_output
            pred_epsilon = alpha_t * model_output + sigma_t * sample

        # 2. clip or threshold x̂0 (DDIM's options; ε̂ stays the model's, as DDIM's default).
        if self.config.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif self.config.clip_sample:
            pred_original_sample = pred_original_sample.clamp(
                -self.config.clip_sample_range, self.config.clip_sample_range
            )

        # 3. the exact update of the backward equation with x̂0 frozen.
        prev_sample = plan.alpha_s * pred_original_sample + plan.c_eps * pred_epsilon

        # 4. optional second-order (2M) correction from the previous model evaluation.
        if self.config.solver_order == 2 and plan.index is not None:
            previous = self._previous
            if previous is not None and previous[0] == plan.index - 1:
                weight = s2n_second_order_coefficient(
                    plan.lambda_s - plan.lambda_t, plan.lambda_t - previous[2], plan.rho
                )
                if weight != 0:
                    prev_sample = prev_sample + (plan.alpha_s * weight) * (
                        pred_original_sample - previous[1]
                    )
            self._previous = (plan.index, pred_original_sample, plan.lambda_t)

        # 5. fresh noise, drawn whenever ρ > 0 at this step (DDIM draws whenever eta > 0).
        if plan.rho > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape,
                    generator=generator,
                    device=model_output.device,
                    dtype=model_output.dtype,
                )
            if plan.c_noise > 0:
                prev_sample = prev_sample + plan.c_noise * variance_noise

        if not return_dict:
            return prev_sample, pred_original_sample
        return S2NSchedulerOutput(
            prev_sample=prev_sample, pred_original_sample=pred_original_sample
        )

    # Mirrors diffusers DDIMScheduler.add_noise / get_velocity (test_add_noise_and_velocity_match_ddim).
    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """The forward marginal z_t = α_t x + σ_t ε at integer ``timesteps`` (one per sample)."""
        self.alphas_cumprod = self.alphas_cumprod.to(device=original_samples.device)
        bar = self.alphas_cumprod.to(dtype=original_samples.dtype)[
            timesteps.to(original_samples.device)
        ].flatten()
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        alpha, sigma = (bar**0.5).reshape(shape), ((1 - bar) ** 0.5).reshape(shape)
        return alpha * original_samples + sigma * noise

    def get_velocity(
        self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """The v-prediction target α_t ε − σ_t x (Salimans & Ho 2022) for training."""
        self.alphas_cumprod = self.alphas_cumprod.to(device=sample.device)
        bar = self.alphas_cumprod.to(dtype=sample.dtype)[timesteps.to(sample.device)].flatten()
        shape = (-1,) + (1,) * (sample.dim() - 1)
        alpha, sigma = (bar**0.5).reshape(shape), ((1 - bar) ** 0.5).reshape(shape)
        return alpha * noise - sigma * sample


def _log_snr(alpha_bar: float) -> float:
    """λ = ½ log(ᾱ / (1 − ᾱ)), ±inf at ᾱ ∈ {0, 1}."""
    if alpha_bar <= 0:
        return -math.inf
    if alpha_bar >= 1:
        return math.inf
    return 0.5 * (math.log(alpha_bar) - math.log1p(-alpha_bar))


def run_denoising_loop(
    scheduler: SchedulerMixin,
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    num_inference_steps: int | None = None,
    *,
    timesteps: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    **step_kwargs: Any,
) -> torch.Tensor:
    """The loop a diffusers pipeline runs, without the model plumbing (any scheduler).

    ``set_timesteps``, then for every timestep t: ``model_fn(scale_model_input(z, t), t)`` and
    ``z = step(output, t, z).prev_sample``.

    Args:
        scheduler (`SchedulerMixin`):
            Any diffusers scheduler whose ``step`` returns an output with ``prev_sample``; its
            timesteps are set here.
        model_fn (`Callable[[torch.Tensor, torch.Tensor], torch.Tensor]`):
            ``model_fn(z, t)`` returns the network output (the scheduler's ``prediction_type``)
            at timestep ``t``.
        noise (`torch.Tensor`):
            The initial latent, before the ``init_noise_sigma`` scaling the loop applies.
        num_inference_steps (`int`, *optional*, defaults to `None`):
            The number of sampling steps, spaced by the scheduler; ignored when ``timesteps``
            is given.
        timesteps (`Sequence[int]`, *optional*, defaults to `None`):
            Explicit timesteps, passed as ``set_timesteps(timesteps=...)`` (the scheduler must
            accept them).
        generator (`torch.Generator`, *optional*, defaults to `None`):
            Passed to every ``step`` call as ``generator=`` (the noise of stochastic steps).
        step_kwargs (additional keyword arguments, *optional*):
            Passed to every ``step`` call (e.g. ``eta=1.0`` for ``DDIMScheduler``).

    Returns:
        `torch.Tensor`: the sample after the last step.
    """
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps)
    else:
        scheduler.set_timesteps(num_inference_steps)
    sample = noise * scheduler.init_noise_sigma
    if generator is not None:
        step_kwargs["generator"] = generator
    for t in scheduler.timesteps:
        output = model_fn(scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(output, t, sample, **step_kwargs).prev_sample
    return sample

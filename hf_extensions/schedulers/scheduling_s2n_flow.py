"""``S2NFlowMatchScheduler``: the S2N generalized backward update inside flow-matching pipelines.

Doan et al., "Connective Viewpoints of Signal-to-Noise Diffusion Models" (arXiv 2408.04221):
rectified flow / flow matching is the S2N model z_σ = (1 − σ) x + σ ε (α = 1 − σ), and the
backward family with parameter ρ ≥ 0 (``hf_extensions.schedulers.snr``, module docstring) steps
σ → σ' with x̂0 frozen exactly as

    z' = α' x̂0 + σ' e^{−ρ²h} ε̂ + s_noise · σ' sqrt(1 − e^{−2ρ²h}) ξ,    h = λ' − λ, λ = log(α/σ),

where, for a velocity network u ≈ ε − x (``FlowMatchEulerDiscreteScheduler``'s target),
x̂0 = z − σ u and ε̂ = z + (1 − σ) u. At ρ = 0 this is exactly the flow Euler step
z' = z + (σ' − σ) u (so ρ = 0 reproduces ``FlowMatchEulerDiscreteScheduler``); ρ > 0 injects
fresh noise while keeping the marginals, and ρ → ∞ is that scheduler's ``stochastic_sampling``
(z' = α' x̂0 + σ' ξ).

The class subclasses ``FlowMatchEulerDiscreteScheduler`` and changes only ``step``: its sigmas,
shift (static and resolution-dependent ``mu``), Karras / exponential / beta sigmas,
``set_timesteps(sigmas=..., mu=...)``, ``set_begin_index`` and ``scale_noise`` are the parent's,
so SD3 / Flux-style pipelines take it in place of their scheduler::

    pipe.scheduler = S2NFlowMatchScheduler.from_config(pipe.scheduler.config, rho=0.5)

EDM-family pipelines are not covered: diffusers' EDM schedulers (``EDMEulerScheduler``,
``EDMDPMSolverMultistepScheduler``) precondition the model input and output inside the scheduler
(c_in, c_skip, c_out) and their configs' ``rho`` is the Karras exponent; EDM sampling with the
S2N update is :func:`hf_extensions.schedulers.sample_s2n` with ``EDMSchedule``, outside a
pipeline.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import (
    FlowMatchEulerDiscreteScheduler,
    FlowMatchEulerDiscreteSchedulerOutput,
)
from diffusers.utils.torch_utils import randn_tensor

from hf_extensions.schedulers.snr import convert_prediction, s2n_coefficients
from hf_extensions.validation import check_bool, check_positive, refuse

__all__ = ["S2NFlowMatchScheduler"]


class S2NFlowMatchScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching scheduler with the S2N backward family's ρ (Doan et al. 2024, Sec. 3).

    The parameters up to ``stochastic_sampling`` are ``FlowMatchEulerDiscreteScheduler``'s, with
    its defaults and meaning; ``rho`` and ``s_noise`` are the S2N ones.

    Args:
        rho (`float`, *optional*, defaults to `0.0`):
            ρ ≥ 0 of the backward equation: 0 is the flow Euler step (the probability-flow ODE);
            1 the reverse SDE; larger values re-noise more (ρ → ∞: ``stochastic_sampling``).
        s_noise (`float`, *optional*, defaults to `1.0`):
            Scale (≥ 0) of the injected noise (EDM's S_noise); 1 keeps the marginals.

    Raises:
        ValueError: a negative or non-finite ``rho`` / ``s_noise``; ``stochastic_sampling=True``
            (its re-noising is the ρ → ∞ limit: set ``rho`` instead) or ``invert_sigmas=True``
            (σ increasing along sampling is not a backward step) together with ``rho`` > 0.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        stochastic_sampling: bool = False,
        rho: float = 0.0,
        s_noise: float = 1.0,
    ):
        rho = check_positive("rho", rho, allow_zero=True)
        s_noise = check_positive("s_noise", s_noise, allow_zero=True)
        if check_bool("stochastic_sampling", stochastic_sampling):
            refuse(
                "stochastic_sampling",
                "False (its re-noising is the rho -> inf limit of this scheduler; set `rho`)",
                stochastic_sampling,
            )
        if check_bool("invert_sigmas", invert_sigmas) and rho > 0:
            refuse("invert_sigmas", "False when `rho` > 0 (sigma must fall)", invert_sigmas)
        self.register_to_config(rho=float(rho), s_noise=float(s_noise))
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            shift=shift,
            use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift,
            max_shift=max_shift,
            base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len,
            invert_sigmas=invert_sigmas,
            shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            time_shift_type=time_shift_type,
            stochastic_sampling=stochastic_sampling,
        )

    def step(
        self,
        model_output: torch.FloatTensor,
        timestep: float | torch.FloatTensor,
        sample: torch.FloatTensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        """One step σ → σ' of the generalized backward equation (module docstring).

        The signature is the parent's (pipelines call ``step(output, t, latents)``); its
        ``s_churn`` / ``s_tmin`` / ``s_tmax`` / ``s_noise`` arguments are unused there and here
        (the noise scale is ``config.s_noise``). ``generator`` draws ξ when ρ > 0.
        ``per_token_timesteps`` is supported at ρ = 0 only (the parent's step).
        """
        rho = self.config.rho
        if per_token_timesteps is not None:
            if rho > 0:
                refuse("per_token_timesteps", "None when `rho` > 0", "a tensor")
            return super().step(
                model_output,
                timestep,
                sample,
                generator=generator,
                per_token_timesteps=per_token_timesteps,
                return_dict=return_dict,
            )
        if isinstance(timestep, int) or (
            isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()
        ):
            raise ValueError(
                "pass one of `scheduler.timesteps` as `timestep` (an integer index is not a "
                "flow-matching timestep), as FlowMatchEulerDiscreteScheduler requires."
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = float(self.sigmas[self.step_index])
        sigma_next = float(self.sigmas[self.step_index + 1])
        z = sample.to(torch.float32)
        x0, eps = convert_prediction(
            model_output.to(torch.float32), z, 1.0 - sigma, sigma, "flow_prediction"
        )
        c_x0, c_eps, c_noise = s2n_coefficients(
            1.0 - sigma, sigma, 1.0 - sigma_next, sigma_next, rho, self.config.s_noise
        )
        prev_sample = c_x0 * x0 + c_eps * eps
        if c_noise > 0:
            noise = randn_tensor(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            prev_sample = prev_sample + c_noise * noise
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)

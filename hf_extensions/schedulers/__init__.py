"""diffusers schedulers of the signal-to-noise family (Doan et al., arXiv 2408.04221).

- :class:`S2NGeneralizedScheduler`: the generalized backward equation with one knob ρ
  (0 = DDIM / probability-flow ODE, 1 = reverse SDE = DDIM eta 1), a drop-in diffusers scheduler.
- :class:`S2NFlowMatchScheduler`: the same update for flow-matching pipelines (SD3, Flux), a
  drop-in for ``FlowMatchEulerDiscreteScheduler`` (ρ = 0 reproduces it).
- :mod:`~hf_extensions.schedulers.snr`: the S2N view (α, σ, λ, SNR) of VP, VE, EDM and
  flow-matching schedules, prediction conversions, and :func:`sample_s2n`, one sampler for all.
- :mod:`~hf_extensions.schedulers.information`: MMSE(SNR), the I-MMSE relation, and Gaussian
  mixtures with an exact posterior mean (the exact denoiser).
"""

from hf_extensions.schedulers.information import (
    GaussianMixture,
    excess_mse,
    gaussian_mmse,
    i_mmse_mutual_information,
    mmse,
    mmse_of_denoiser,
    mutual_information,
)
from hf_extensions.schedulers.scheduling_s2n import (
    S2NGeneralizedScheduler,
    S2NSchedulerOutput,
    run_denoising_loop,
)
from hf_extensions.schedulers.scheduling_s2n_flow import S2NFlowMatchScheduler
from hf_extensions.schedulers.snr import (
    BETA_SCHEDULES,
    EDMSchedule,
    FlowMatchingSchedule,
    S2NSchedule,
    VESchedule,
    VPSchedule,
    convert_prediction,
    make_betas,
    s2n_coefficients,
    sample_s2n,
)

__all__ = [
    "BETA_SCHEDULES",
    "EDMSchedule",
    "FlowMatchingSchedule",
    "GaussianMixture",
    "S2NFlowMatchScheduler",
    "S2NGeneralizedScheduler",
    "S2NSchedule",
    "S2NSchedulerOutput",
    "VESchedule",
    "VPSchedule",
    "convert_prediction",
    "excess_mse",
    "gaussian_mmse",
    "i_mmse_mutual_information",
    "make_betas",
    "mmse",
    "mmse_of_denoiser",
    "mutual_information",
    "run_denoising_loop",
    "s2n_coefficients",
    "sample_s2n",
]

"""The S2N view of VP / VE / EDM / flow-matching schedules, prediction conversions, the exact
update's coefficients, and one sampler across model families."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from scipy.stats import wasserstein_distance

from hf_extensions.schedulers import (
    EDMSchedule,
    FlowMatchingSchedule,
    GaussianMixture,
    VESchedule,
    VPSchedule,
    convert_prediction,
    s2n_coefficients,
    sample_s2n,
)
from hf_extensions.schedulers.snr import s2n_second_order_coefficient

BIMODAL = GaussianMixture(weights=[0.3, 0.7], means=[[-1.0], [1.0]], stds=[0.25, 0.25])
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _vp():
    return VPSchedule.from_config(DDIMScheduler(**SD_BETAS).config)


def test_vp_view_matches_diffusers():
    schedule = _vp()
    t = torch.arange(1000)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(1000, dtype=torch.float64))
    ddim = DDIMScheduler(**SD_BETAS)
    torch.testing.assert_close(alpha**2, ddim.alphas_cumprod.double(), atol=1e-7, rtol=1e-6)
    # σ/α is the Karras / EDM noise level of the VP model: Euler's sigmas.
    euler_sigmas = EulerDiscreteScheduler(**SD_BETAS).sigmas[:-1].double().flip(0)
    torch.testing.assert_close(schedule.ve_sigma(t), euler_sigmas, atol=0, rtol=1e-5)
    lambda_t = DPMSolverMultistepScheduler(**SD_BETAS).lambda_t.double()
    torch.testing.assert_close(schedule.log_snr(t), lambda_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(schedule.snr(t), torch.exp(2 * schedule.log_snr(t)))
    # Fractional times interpolate λ, and t(λ) inverts it.
    times = torch.tensor([3.25, 100.5, 998.9], dtype=torch.float64)
    torch.testing.assert_close(schedule.t_from_log_snr(schedule.log_snr(times)), times)
    assert bool((schedule.log_snr(t)[1:] < schedule.log_snr(t)[:-1]).all())


def test_vp_view_of_zero_terminal_snr():
    schedule = VPSchedule.from_config(rescale_betas_zero_snr=True, **SD_BETAS)
    assert schedule.log_snr(999) == -math.inf and float(schedule.alpha(999)) == 0.0
    assert float(schedule.sigma(999)) == 1.0
    assert math.isfinite(float(schedule.log_snr(998)))


def test_flow_matching_view_matches_diffusers_shift():
    schedule = FlowMatchingSchedule(shift=3.0)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    unshifted = FlowMatchingSchedule()
    torch.testing.assert_close(unshifted.alpha(t), 1 - t)
    torch.testing.assert_close(unshifted.sigma(t), t)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    grid = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    torch.testing.assert_close(schedule.sigma(grid), reference.sigmas.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(schedule.alpha(t) + schedule.sigma(t), torch.ones_like(t))
    inner = t[1:-1]
    torch.testing.assert_close(schedule.t_from_log_snr(schedule.log_snr(inner)), inner)


def test_edm_and_ve_views():
    edm = EDMSchedule()
    reference = EDMEulerScheduler(sigma_schedule="karras")
    reference.set_timesteps(12)
    torch.testing.assert_close(
        edm.karras_sigmas(12), reference.sigmas[:-1].double(), atol=1e-4, rtol=1e-5
    )
    sigmas = torch.tensor([0.01, 1.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(edm.log_snr(sigmas), -torch.log(sigmas))
    ve = VESchedule(sigma_min=0.01, sigma_max=50.0)
    torch.testing.assert_close(
        ve.sigma(torch.tensor([0.0, 1.0])), torch.tensor([0.01, 50.0]).double()
    )
    times = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(ve.t_from_log_snr(ve.log_snr(times)), times)
    torch.testing.assert_close(ve.ve_sigma(times), ve.sigma(times))
    with pytest.raises(ValueError, match="sigma_min"):
        VESchedule(sigma_min=2.0, sigma_max=1.0)


@pytest.mark.parametrize(
    "prediction_type", ["epsilon", "sample", "v_prediction", "flow_prediction"]
)
def test_convert_prediction_recovers_data_and_noise(prediction_type):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(100, generator=generator, dtype=torch.float64)
    eps = torch.randn(100, generator=generator, dtype=torch.float64)
    if prediction_type == "flow_prediction":
        alpha, sigma = 0.3, 1.9  # α + σ = 1 is not needed: v = ε − x for any schedule
    else:
        alpha, sigma = math.cos(0.4), math.sin(0.4)
    z = alpha * x + sigma * eps
    output = {
        "epsilon": eps,
        "sample": x,
        "v_prediction": alpha * eps - sigma * x,
        "flow_prediction": eps - x,
    }[prediction_type]
    x0, eps_hat = convert_prediction(output, z, alpha, sigma, prediction_type)
    torch.testing.assert_close(x0, x)
    torch.testing.assert_close(eps_hat, eps)
    with pytest.raises(ValueError, match="prediction_type"):
        convert_prediction(output, z, alpha, sigma, "score")


def test_coefficients_keep_the_marginal_and_match_the_dpm_plus_plus_sde_form():
    """c_eps² + c_noise² = σ_s² for every ρ (the marginal is kept), and the update equals
    k-diffusion's first-order DPM++ SDE with eta = ρ²:
    z_s = (σ_s/σ_t) e^{−ρ²h} z_t + α_s (1 − e^{−(1+ρ²)h}) x̂0 + noise."""
    schedule = _vp()
    generator = torch.Generator().manual_seed(0)
    z_t = torch.randn(50, generator=generator, dtype=torch.float64)
    x0 = torch.randn(50, generator=generator, dtype=torch.float64)
    for t, s in [(999, 800), (500, 480), (40, 0)]:
        a_t, s_t, a_s, s_s = (float(v) for v in (*_as(schedule, t), *_as(schedule, s)))
        h = float(schedule.log_snr(s) - schedule.log_snr(t))
        for rho in (0.0, 0.3, 1.0, 2.5):
            c_x0, c_eps, c_noise = s2n_coefficients(a_t, s_t, a_s, s_s, rho)
            assert c_x0 == a_s
            assert math.isclose(c_eps**2 + c_noise**2, s_s**2, rel_tol=1e-12)
            assert math.isclose(c_eps, s_s * math.exp(-(rho**2) * h), rel_tol=1e-10)
            ours = c_x0 * x0 + c_eps * (z_t - a_t * x0) / s_t
            theirs = (s_s / s_t) * math.exp(-(rho**2) * h) * z_t + a_s * (
                -math.expm1(-(1 + rho**2) * h)
            ) * x0
            torch.testing.assert_close(ours, theirs)
        _, _, no_noise = s2n_coefficients(a_t, s_t, a_s, s_s, 0.0)
        assert no_noise == 0.0
    # The final step to σ = 0 and a start at SNR 0 need no special case.
    assert s2n_coefficients(0.3, 0.95, 1.0, 0.0, 1.0) == (1.0, 0.0, 0.0)
    assert s2n_coefficients(0.0, 1.0, 0.5, 0.8, 1.0) == (0.5, 0.0, 0.8)
    with pytest.raises(ValueError, match="rho"):
        s2n_coefficients(0.5, 0.8, 0.6, 0.7, -1.0)
    with pytest.raises(ValueError, match="increase the SNR"):
        s2n_coefficients(0.6, 0.7, 0.5, 0.8, 1.0)
    assert s2n_second_order_coefficient(math.inf, 1.0, 0.0) == 0.0


def _as(schedule, t):
    return schedule.alpha(t), schedule.sigma(t)


def _family_run(schedule, log_snrs, noise, rho, step_noises):
    times = schedule.t_from_log_snr(log_snrs)

    def denoiser(z, alpha, sigma):
        return BIMODAL.posterior_mean(z, alpha, sigma)

    result = sample_s2n(denoiser, schedule, times, noise, rho, step_noises=step_noises)
    alphas = schedule.alpha(times)
    scaled = [z / alpha for z, alpha in zip(result.trajectory[:-1], alphas)]
    return result.sample, scaled


@pytest.mark.parametrize("rho", [0.0, 1.0])
def test_one_sampler_gives_the_same_trajectory_for_every_family_on_one_lambda_grid(rho):
    """In z/α the update depends on λ only: VP, VE, EDM and flow matching agree exactly."""
    log_snrs = torch.linspace(-2.5, 3.4, 12, dtype=torch.float64)  # inside the VP range
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(500, 1, generator=generator, dtype=torch.float64)
    step_noises = [torch.randn(500, 1, generator=generator, dtype=torch.float64) for _ in log_snrs]
    # z_0 = σ_0 ε is the same point e^{−λ_0} ε in z/α for every family.
    families = [_vp(), VESchedule(0.005, 60.0), EDMSchedule(), FlowMatchingSchedule(shift=3.0)]
    runs = [_family_run(s, log_snrs, noise, rho, step_noises) for s in families]
    final, path = runs[0]
    for other_final, other_path in runs[1:]:
        torch.testing.assert_close(other_final, final, atol=1e-9, rtol=0)
        for ours, theirs in zip(path, other_path):
            torch.testing.assert_close(theirs, ours, atol=1e-9, rtol=1e-9)


def test_sampler_on_flow_matching_with_a_velocity_model_reaches_the_data():
    schedule = FlowMatchingSchedule()
    times = torch.linspace(0.999, 0.02, 40, dtype=torch.float64)

    def velocity_denoiser(z, alpha, sigma):  # a flow network predicts v = ε − x
        x0 = BIMODAL.posterior_mean(z, alpha, sigma)
        velocity = (z - alpha * x0) / sigma - x0
        return convert_prediction(velocity, z, alpha, sigma, "flow_prediction")[0]

    noise = torch.randn(5000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = BIMODAL.sample(20000, generator=torch.Generator().manual_seed(1))
    floor = wasserstein_distance(
        BIMODAL.sample(5000, generator=torch.Generator().manual_seed(2))[:, 0].numpy(),
        reference[:, 0].numpy(),
    )
    for rho in (0.0, 1.0):
        out = sample_s2n(
            velocity_denoiser, schedule, times, noise, rho, generator=torch.Generator()
        ).sample
        error = wasserstein_distance(out[:, 0].numpy(), reference[:, 0].numpy())
        assert error < 2 * floor, (rho, error, floor)  # at the sampling-noise level
    prior = wasserstein_distance(noise[:, 0].numpy(), reference[:, 0].numpy())
    assert prior > 0.3  # far from the data before sampling

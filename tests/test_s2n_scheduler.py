"""S2NGeneralizedScheduler: DDIM equivalences, exactness on point masses, the ρ knob, the 2M
variant against DPM-Solver++, configs, and the swap into a Stable Diffusion pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from scipy.stats import wasserstein_distance

from hf_extensions.models import tiny_stable_diffusion_pipeline
from hf_extensions.schedulers import (
    GaussianMixture,
    S2NGeneralizedScheduler,
    make_betas,
    run_denoising_loop,
)

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
BIMODAL = GaussianMixture(weights=[0.3, 0.7], means=[[-1.0], [1.0]], stds=[0.25, 0.25])


def gmm_model(scheduler, prediction_type="epsilon", data=BIMODAL, eps_scale=1.0):
    """The exact network of ``data`` (posterior mean) in a diffusers target, element-wise."""
    bars = scheduler.alphas_cumprod.to(torch.float64)

    def model(z, t):
        bar = bars[int(t)]
        alpha, sigma = bar.sqrt(), (1 - bar).sqrt()
        x0 = data.posterior_mean(z.reshape(-1, 1), alpha, sigma).reshape(z.shape).to(z.dtype)
        eps = eps_scale * (z - alpha * x0) / sigma
        if prediction_type == "epsilon":
            return eps.to(z.dtype)
        if prediction_type == "sample":
            return x0
        return (alpha * eps - sigma * x0).to(z.dtype)  # v

    return model


def _noise(shape=(4, 3, 6, 6), seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- DDIM equivalence


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_rho1_reproduces_ddim_eta1_with_the_same_noise(prediction_type):
    config = {**SD_BETAS, "prediction_type": prediction_type, "clip_sample": False}
    ddim, s2n = DDIMScheduler(**config), S2NGeneralizedScheduler(**config, rho=1.0)
    model = gmm_model(ddim, prediction_type)

    def run(scheduler, dtype, **kwargs):
        generator = torch.Generator().manual_seed(3)
        noise = _noise(dtype=dtype)
        return run_denoising_loop(scheduler, model, noise, 50, generator=generator, **kwargs)

    expected = run(ddim, torch.float32, eta=1.0)
    assert (expected - run(ddim, torch.float32)).abs().max() > 0.1  # the noise matters
    # DDIM computes its noise std in float32, where 1 − ᾱ_t/ᾱ_s cancels digits (~1e-5 after
    # 50 steps); with DDIM's ᾱ upcast to float64 the two agree to float32 rounding of α, σ.
    torch.testing.assert_close(run(s2n, torch.float32), expected, atol=5e-5, rtol=0)
    ddim.alphas_cumprod = ddim.alphas_cumprod.double()
    ddim.final_alpha_cumprod = ddim.final_alpha_cumprod.double()
    torch.testing.assert_close(
        run(s2n, torch.float64), run(ddim, torch.float64, eta=1.0), atol=5e-6, rtol=0
    )


def test_clipping_and_thresholding_follow_ddim():
    for extra in ({"clip_sample": True, "clip_sample_range": 0.8}, {"thresholding": True}):
        config = {**SD_BETAS, "clip_sample": False, "prediction_type": "sample", **extra}
        ddim, s2n = DDIMScheduler(**config), S2NGeneralizedScheduler(**config)
        model = gmm_model(ddim, "sample", eps_scale=1.0)

        def wide(z, t, model=model):
            return 1.5 * model(z, t)  # x̂0 beyond the clipping range

        expected = run_denoising_loop(ddim, wide, _noise(), 10)
        torch.testing.assert_close(run_denoising_loop(s2n, wide, _noise(), 10), expected)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("rho", [0.0, 0.5, 1.0, 2.0])
def test_point_mass_data_is_exact_for_any_rho_and_step_size(rho):
    """x = c: the exact x̂0 is c, so every step keeps z_s ~ N(α_s c, σ_s²) and ends at c."""
    c = 0.37
    scheduler = S2NGeneralizedScheduler(**SD_BETAS, clip_sample=False, rho=rho)
    bars = scheduler.alphas_cumprod.double()
    generator = torch.Generator().manual_seed(0)
    for steps in (2, 9, 50):
        scheduler.set_timesteps(steps)
        first = torch.randn(20000, dtype=torch.float64, generator=generator)
        start = bars[scheduler.timesteps[0]]
        z = start.sqrt() * c + (1 - start).sqrt() * first  # the marginal at the first timestep
        for t in scheduler.timesteps:
            bar = bars[t]
            eps = (z - bar.sqrt() * c) / (1 - bar).sqrt()  # the exact ε-prediction
            out = scheduler.step(eps, t, z, generator=generator)
            z = out.prev_sample
            # x̂0 = (z − σ_t ε)/α_t carries DDIM's float32 rounding of σ_t, divided by α_t.
            atol = 1e-6 / float(bar.sqrt())
            x0 = out.pred_original_sample
            torch.testing.assert_close(x0, torch.full_like(z, c), atol=atol, rtol=0)
            prev = t - 1000 // steps
            if prev >= 0:
                normalized = (z - bars[prev].sqrt() * c) / (1 - bars[prev]).sqrt()
                if rho == 0:  # the ODE carries the initial noise unchanged
                    expected = bars[prev].sqrt() * c + (1 - bars[prev]).sqrt() * first
                    torch.testing.assert_close(z, expected, atol=1e-6, rtol=0)
                else:  # a fresh N(0, 1) at every step: the marginal is preserved
                    assert abs(float(normalized.std()) - 1) < 0.03
                    assert abs(float(normalized.mean())) < 0.03
        torch.testing.assert_close(z, torch.full_like(z, c), atol=1e-6, rtol=0)


def _w1(samples, reference):
    return wasserstein_distance(samples.flatten().numpy(), reference.flatten().numpy())


def test_error_falls_with_more_steps():
    reference = BIMODAL.sample(20000, generator=torch.Generator().manual_seed(1))
    for rho in (0.0, 1.0):
        scheduler = S2NGeneralizedScheduler(clip_sample=False, timestep_spacing="trailing", rho=rho)
        model = gmm_model(scheduler)
        errors = [
            _w1(
                run_denoising_loop(
                    scheduler,
                    model,
                    _noise((5000, 1), dtype=torch.float64),
                    steps,
                    generator=torch.Generator().manual_seed(2),
                ),
                reference,
            )
            for steps in (5, 20, 100)
        ]
        assert errors[0] > errors[1] > errors[2], (rho, errors)


def test_rho1_corrects_a_biased_denoiser_better_than_ddim():
    """ε̂ = 1.1 ε: the stochastic sampler forgets the accumulated error (benchmark claim, small)."""
    reference = BIMODAL.sample(20000, generator=torch.Generator().manual_seed(1))
    errors = {}
    for name, scheduler in {
        "ddim": DDIMScheduler(clip_sample=False, timestep_spacing="trailing"),
        "rho1": S2NGeneralizedScheduler(clip_sample=False, timestep_spacing="trailing", rho=1.0),
    }.items():
        samples = run_denoising_loop(
            scheduler,
            gmm_model(scheduler, eps_scale=1.1),
            _noise((5000, 1), dtype=torch.float64),
            50,
            generator=torch.Generator().manual_seed(2),
        )
        errors[name] = _w1(samples, reference)
    assert errors["rho1"] < 0.7 * errors["ddim"], errors


# ----------------------------------------------------------------------------- the knobs


def _steps_with_noise(scheduler, model, z, noises):
    for t, xi in zip(scheduler.timesteps, noises):
        z = scheduler.step(model(z, t), t, z, variance_noise=xi).prev_sample
    return z


def test_noise_window_and_s_noise():
    base = {**SD_BETAS, "clip_sample": False}
    ode = S2NGeneralizedScheduler(**base)
    model = gmm_model(ode)
    noises = [_noise(seed=10 + i) for i in range(20)]

    def run(**kwargs):
        scheduler = S2NGeneralizedScheduler(**base, **kwargs)
        scheduler.set_timesteps(20)
        return _steps_with_noise(scheduler, model, _noise(), noises)

    full = run(rho=1.0)
    assert (full - run()).abs().max() > 0.1
    # A window that contains every step is no window; one that contains none is ρ = 0.
    torch.testing.assert_close(run(rho=1.0, rho_t_min=0, rho_t_max=999), full)
    torch.testing.assert_close(run(rho=1.0, rho_t_min=990), run(rho=0.0))
    # A partial window differs from both.
    partial = run(rho=1.0, rho_t_max=500)
    assert (partial - full).abs().max() > 1e-3 and (partial - run()).abs().max() > 1e-3
    # One step: the injected noise is s_noise · σ_s sqrt(1 − e^{−2ρ²h}) ξ, linear in s_noise.
    z, xi = _noise(), noises[0]

    def one_step(s_noise):
        scheduler = S2NGeneralizedScheduler(**base, rho=1.0, s_noise=s_noise)
        scheduler.set_timesteps(20)
        t = scheduler.timesteps[3]
        return scheduler.step(model(z, t), t, z, variance_noise=xi).prev_sample

    zero, one, two = (one_step(s) for s in (0.0, 1.0, 2.0))
    assert (one - zero).abs().max() > 1e-2
    torch.testing.assert_close(two - zero, 2 * (one - zero), atol=1e-6, rtol=1e-5)


def test_step_refuses_a_non_zero_eta_and_needs_set_timesteps():
    scheduler = S2NGeneralizedScheduler(rho=1.0)
    z = _noise()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(z, 999, z)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="rho"):
        scheduler.step(z, scheduler.timesteps[0], z, eta=0.5)
    with pytest.raises(ValueError, match="generator"):
        scheduler.step(z, 900, z, generator=torch.Generator(), variance_noise=z)


def test_custom_timesteps_step_to_the_next_entry():
    scheduler = S2NGeneralizedScheduler(**SD_BETAS, clip_sample=False)
    scheduler.set_timesteps(timesteps=[999, 700, 301, 40])
    assert scheduler.timesteps.tolist() == [999, 700, 301, 40]
    bars = scheduler.alphas_cumprod.double()
    c, z = -0.5, _noise(dtype=torch.float64)
    start = z.clone()
    z = z * (1 - bars[999]).sqrt() + bars[999].sqrt() * c
    for t, prev in zip([999, 700, 301], [700, 301, 40]):
        eps = (z - bars[t].sqrt() * c) / (1 - bars[t]).sqrt()
        z = scheduler.step(eps, t, z).prev_sample
        normalized = (z - bars[prev].sqrt() * c) / (1 - bars[prev]).sqrt()
        torch.testing.assert_close(normalized, start, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="decreasing"):
        scheduler.set_timesteps(timesteps=[10, 20])
    with pytest.raises(ValueError, match="exactly one"):
        scheduler.set_timesteps(10, timesteps=[20, 10])
    with pytest.raises(ValueError, match="num_train_timesteps"):
        scheduler.set_timesteps(timesteps=[1000, 10])


def test_prev_timestep_rule_next_departs_from_ddim_only_off_grid():
    config = {**SD_BETAS, "clip_sample": False, "timestep_spacing": "linspace"}
    model = gmm_model(DDIMScheduler(**config))
    ddim_rule = S2NGeneralizedScheduler(**config)
    next_rule = S2NGeneralizedScheduler(**config, prev_timestep_rule="next")
    # 7 steps: round(linspace(0, 999, 7)) is not a t − 142 grid; 10 steps with trailing is.
    off_grid = (
        (
            run_denoising_loop(ddim_rule, model, _noise(), 7)
            - run_denoising_loop(next_rule, model, _noise(), 7)
        )
        .abs()
        .max()
    )
    assert off_grid > 1e-4
    config["timestep_spacing"] = "trailing"
    on_grid = [
        run_denoising_loop(
            S2NGeneralizedScheduler(**config, prev_timestep_rule=r), model, _noise(), 10
        )
        for r in ("ddim", "next")
    ]
    torch.testing.assert_close(on_grid[0], on_grid[1], atol=0, rtol=0)


@pytest.mark.parametrize(("rho", "algorithm"), [(0.0, "dpmsolver++"), (1.0, "sde-dpmsolver++")])
def test_second_order_is_dpm_solver_plus_plus_2m(rho, algorithm):
    """solver_order=2 at ρ = 0 / 1 is DPM-Solver++(2M) / SDE-DPM-Solver++(2M), solver_type heun."""
    timesteps = list(range(999, 0, -50))
    s2n = S2NGeneralizedScheduler(
        **SD_BETAS, clip_sample=False, set_alpha_to_one=False, solver_order=2, rho=rho
    )
    dpm = DPMSolverMultistepScheduler(
        **SD_BETAS,
        algorithm_type=algorithm,
        solver_order=2,
        solver_type="heun",
        final_sigmas_type="sigma_min",
        lower_order_final=False,
    )
    first = S2NGeneralizedScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, rho=rho)
    for scheduler in (s2n, dpm, first):
        scheduler.set_timesteps(timesteps=timesteps)
    model = gmm_model(s2n)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 1, generator=generator, dtype=torch.float64)
    correction = 0.0
    for t in timesteps:
        xi = torch.randn(z.shape, generator=generator, dtype=z.dtype)
        output = model(z, t)
        ours = s2n.step(output, t, z, variance_noise=xi).prev_sample
        theirs = dpm.step(output, t, z, variance_noise=xi).prev_sample
        # One step from the same state: equal up to DPM-Solver's float32 sigmas.
        torch.testing.assert_close(ours, theirs, atol=2e-6 * float(ours.abs().max()), rtol=0)
        first_order = first.step(output, t, z, variance_noise=xi).prev_sample
        correction = max(correction, float((ours - first_order).abs().max()))
        z = ours
    assert correction > 1e-3  # the second-order term is really there


def test_second_order_is_more_accurate_with_few_steps():
    reference = BIMODAL.sample(20000, generator=torch.Generator().manual_seed(1))
    errors = {}
    for order in (1, 2):
        scheduler = S2NGeneralizedScheduler(
            clip_sample=False, timestep_spacing="trailing", solver_order=order
        )
        samples = run_denoising_loop(
            scheduler, gmm_model(scheduler), _noise((5000, 1), dtype=torch.float64), 8
        )
        errors[order] = _w1(samples, reference)
    assert errors[2] < 0.7 * errors[1], errors


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "source",
    [
        DDIMScheduler(**SD_BETAS, steps_offset=1, clip_sample=False, set_alpha_to_one=False),
        PNDMScheduler(**SD_BETAS, steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False),
        EulerDiscreteScheduler(**SD_BETAS, prediction_type="v_prediction", steps_offset=1),
    ],
    ids=["ddim", "pndm", "euler"],
)
def test_from_config_of_vp_schedulers_keeps_their_schedule(source):
    scheduler = S2NGeneralizedScheduler.from_config(source.config, rho=0.3)
    assert scheduler.config.rho == 0.3
    for key in ("beta_start", "beta_end", "beta_schedule", "prediction_type", "steps_offset"):
        assert scheduler.config[key] == source.config[key]
    torch.testing.assert_close(scheduler.alphas_cumprod, source.alphas_cumprod)


@pytest.mark.parametrize("source", [FlowMatchEulerDiscreteScheduler, EDMEulerScheduler])
def test_from_config_refuses_schedules_that_are_not_vp(source):
    with pytest.raises(ValueError, match="variance-preserving"):
        S2NGeneralizedScheduler.from_config(source().config)


def test_from_config_of_dpm_solver_takes_its_order():
    dpm = DPMSolverMultistepScheduler(**SD_BETAS, solver_order=2)
    assert S2NGeneralizedScheduler.from_config(dpm.config).config.solver_order == 2
    with pytest.raises(ValueError, match="solver_order"):
        S2NGeneralizedScheduler.from_config(DPMSolverMultistepScheduler(solver_order=3).config)


def test_config_is_json_and_round_trips(tmp_path):
    scheduler = S2NGeneralizedScheduler(
        **SD_BETAS, rho=0.6, s_noise=0.9, rho_t_max=800, solver_order=2, timestep_spacing="trailing"
    )
    document = json.loads(scheduler.to_json_string())
    assert document["rho"] == 0.6 and document["rho_t_max"] == 800
    assert document["_class_name"] == "S2NGeneralizedScheduler"
    scheduler.save_pretrained(tmp_path)
    reloaded = S2NGeneralizedScheduler.from_pretrained(tmp_path)
    for key, value in scheduler.config.items():
        if not key.startswith("_"):
            assert reloaded.config[key] == value, key
    model = gmm_model(scheduler)
    runs = [
        run_denoising_loop(s, model, _noise(), 12, generator=torch.Generator().manual_seed(5))
        for s in (scheduler, reloaded)
    ]
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)


def test_add_noise_and_velocity_match_ddim():
    ddim, s2n = DDIMScheduler(**SD_BETAS), S2NGeneralizedScheduler(**SD_BETAS)
    x, eps = _noise(seed=1), _noise(seed=2)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(s2n.add_noise(x, eps, t), ddim.add_noise(x, eps, t))
    torch.testing.assert_close(s2n.get_velocity(x, eps, t), ddim.get_velocity(x, eps, t))


def test_zero_terminal_snr_with_v_prediction_matches_ddim_and_epsilon_is_refused():
    config = {
        **SD_BETAS,
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
        "clip_sample": False,
    }
    ddim = DDIMScheduler(**config, prediction_type="v_prediction")
    s2n = S2NGeneralizedScheduler(**config, prediction_type="v_prediction", rho=0.0)
    assert float(s2n.alphas_cumprod[-1]) == 0.0
    model = gmm_model(ddim, "v_prediction")
    torch.testing.assert_close(
        run_denoising_loop(s2n, model, _noise(), 10),
        run_denoising_loop(ddim, model, _noise(), 10),
        atol=1e-6,
        rtol=0,
    )
    stochastic = S2NGeneralizedScheduler(**config, prediction_type="v_prediction", rho=1.0)
    out = run_denoising_loop(stochastic, model, _noise(), 10, generator=torch.Generator())
    assert torch.isfinite(out).all()
    eps_scheduler = S2NGeneralizedScheduler(**config)
    eps_scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="SNR 0"):
        eps_scheduler.step(_noise(), 999, _noise())


@pytest.mark.parametrize(
    ("schedule", "reference"),
    [
        ("linear", DDPMScheduler),
        ("scaled_linear", DDPMScheduler),
        ("squaredcos_cap_v2", DDPMScheduler),
        ("sigmoid", DDPMScheduler),
        ("laplace", DDPMScheduler),
        ("exp", HeunDiscreteScheduler),
    ],
)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_every_diffusers_beta_schedule(schedule, reference, zero_snr):
    kwargs = {"beta_schedule": schedule}
    if zero_snr:
        if reference is HeunDiscreteScheduler:
            pytest.skip("HeunDiscreteScheduler has no zero-SNR rescaling to compare with")
        kwargs["rescale_betas_zero_snr"] = True
    expected = reference(**kwargs).betas
    torch.testing.assert_close(make_betas(**kwargs), expected)
    torch.testing.assert_close(S2NGeneralizedScheduler(**kwargs).betas, expected)


# ----------------------------------------------------------------------------- pipelines


@pytest.fixture(scope="module")
def tiny_pipe():
    return tiny_stable_diffusion_pipeline()


def _images(pipe, **kwargs):
    return pipe(
        "a red circle",
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kwargs,
    ).images


def test_swaps_into_a_stable_diffusion_pipeline(tiny_pipe):
    ddim_config = tiny_pipe.scheduler.config
    original = tiny_pipe.scheduler
    try:
        expected_ode = _images(tiny_pipe)
        expected_sde = _images(tiny_pipe, eta=1.0)
        tiny_pipe.scheduler = S2NGeneralizedScheduler.from_config(ddim_config)
        assert abs(_images(tiny_pipe) - expected_ode).max() < 1e-5
        tiny_pipe.scheduler = S2NGeneralizedScheduler.from_config(ddim_config, rho=1.0)
        # The pipeline hands its generator to step: the same noise as DDIM eta=1 draws.
        assert abs(_images(tiny_pipe) - expected_sde).max() < 1e-5
        assert abs(expected_sde - expected_ode).max() > 1e-2
        with pytest.raises(ValueError, match="rho"):
            _images(tiny_pipe, eta=0.5)
        # Custom timesteps reach set_timesteps(timesteps=...) through the pipeline.
        custom = _images(tiny_pipe, timesteps=[981, 601, 301, 1])
        assert np.isfinite(custom).all()
        assert tiny_pipe.scheduler.timesteps.tolist() == [981, 601, 301, 1]
    finally:
        tiny_pipe.scheduler = original


def test_pipeline_saves_and_reloads_with_class_and_rho(tiny_pipe, tmp_path):
    original = tiny_pipe.scheduler
    try:
        tiny_pipe.scheduler = S2NGeneralizedScheduler.from_config(original.config, rho=0.7)
        expected = _images(tiny_pipe)
        tiny_pipe.save_pretrained(tmp_path)
    finally:
        tiny_pipe.scheduler = original
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == [
        "hf_extensions.schedulers.scheduling_s2n",
        "S2NGeneralizedScheduler",
    ]
    for loader in (DiffusionPipeline, StableDiffusionPipeline):
        pipe = loader.from_pretrained(tmp_path)
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe.scheduler) is S2NGeneralizedScheduler
        assert pipe.scheduler.config.rho == 0.7
        assert abs(_images(pipe) - expected).max() < 1e-6

"""S2N inside flow-matching pipelines (S2NFlowMatchScheduler) and from_config's clip_sample."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from hf_extensions.schedulers import S2NFlowMatchScheduler, S2NGeneralizedScheduler

CONFIGS = [{"shift": 3.0}, {"use_dynamic_shifting": True}, {"use_karras_sigmas": True}]


def _loop(scheduler, model, noise, steps=6, generator=None, **timestep_kwargs):
    scheduler.set_timesteps(steps, **timestep_kwargs)
    z = noise.clone()
    for t in scheduler.timesteps:
        z = scheduler.step(model(z, t), t, z, generator=generator).prev_sample
    return z


def _velocity(z, t):  # a smooth stand-in network: u(z, σ)
    sigma = t / 1000
    return torch.sin(z) * (1 + sigma) - 0.3 * z


@pytest.mark.parametrize("config", CONFIGS, ids=["shift", "dynamic", "karras"])
def test_rho0_reproduces_flow_match_euler(config):
    kwargs = {"mu": 0.8} if config.get("use_dynamic_shifting") else {}
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    euler = _loop(FlowMatchEulerDiscreteScheduler(**config), _velocity, noise, **kwargs)
    source = FlowMatchEulerDiscreteScheduler(**config).config
    s2n = _loop(S2NFlowMatchScheduler.from_config(source), _velocity, noise, **kwargs)
    torch.testing.assert_close(s2n, euler, rtol=0, atol=1e-5)
    noisy = _loop(S2NFlowMatchScheduler.from_config(source, rho=1.0), _velocity, noise, **kwargs)
    assert (noisy - euler).abs().max() > 1e-2


@pytest.mark.parametrize("rho", [0.5, 1.0])
def test_exact_denoiser_keeps_the_marginals_for_any_rho(rho):
    """Gaussian data N(m, s²): with the exact velocity, every ρ must end at N(m, s²) (a wrong
    noise coefficient would not), and a point mass (s = 0) must be hit exactly."""
    m, s = 0.7, 0.5

    def exact(z, t):  # u = ε − x with the posterior mean of x given z_σ
        sigma = float(t) / 1000
        alpha = 1 - sigma
        x0 = m + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (z - alpha * m)
        return (z - x0) / max(sigma, 1e-12)

    noise = torch.randn(20_000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scheduler = S2NFlowMatchScheduler(shift=3.0, rho=rho)
    out = _loop(scheduler, exact, noise, steps=400, generator=torch.Generator().manual_seed(2))
    assert float(out.mean()) == pytest.approx(m, abs=0.015)
    assert float(out.std()) == pytest.approx(s, rel=0.04)  # first order: 0.367 at 12 steps
    s = 0.0
    point = _loop(scheduler, exact, noise[:64], steps=5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(point, torch.full_like(point, m), rtol=0, atol=1e-6)


def test_flow_scheduler_config_round_trips_and_refuses_bad_settings(tmp_path):
    scheduler = S2NFlowMatchScheduler(shift=3.0, rho=0.7, s_noise=0.9)
    scheduler.save_pretrained(tmp_path)
    loaded = S2NFlowMatchScheduler.from_pretrained(tmp_path)
    assert (loaded.config.rho, loaded.config.s_noise, loaded.config.shift) == (0.7, 0.9, 3.0)
    with pytest.raises(ValueError, match="rho"):
        S2NFlowMatchScheduler(rho=-1.0)
    with pytest.raises(ValueError, match="stochastic_sampling"):
        S2NFlowMatchScheduler(stochastic_sampling=True)
    with pytest.raises(ValueError, match="S2NFlowMatchScheduler"):  # the VP class points here
        S2NGeneralizedScheduler.from_config(FlowMatchEulerDiscreteScheduler().config)


def test_swaps_into_a_flow_matching_pipeline():
    """A tiny SD3 pipeline (flow matching): ρ = 0 gives its own scheduler's latents."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from hf_extensions.models import tiny_stable_diffusion_pipeline

    base = tiny_stable_diffusion_pipeline()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16,
    )  # fmt: skip
    text = CLIPTextConfig(
        vocab_size=base.tokenizer.vocab_size, hidden_size=32, intermediate_size=37,
        num_hidden_layers=1, num_attention_heads=4, projection_dim=32,
        max_position_embeddings=base.tokenizer.model_max_length,
    )  # fmt: skip
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=base.vae, text_encoder=CLIPTextModelWithProjection(text), tokenizer=base.tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(text), tokenizer_2=base.tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)

    def latents():
        return pipe(
            "a red circle", num_inference_steps=4, height=16, width=16, guidance_scale=2.0,
            generator=torch.Generator().manual_seed(0), output_type="latent",
        ).images  # fmt: skip

    expected = latents()
    config = pipe.scheduler.config
    pipe.scheduler = S2NFlowMatchScheduler.from_config(config)
    torch.testing.assert_close(latents(), expected, rtol=0, atol=1e-5)
    pipe.scheduler = S2NFlowMatchScheduler.from_config(config, rho=1.0)
    noisy = latents()
    assert torch.isfinite(noisy).all() and (noisy - expected).abs().max() > 1e-2


@pytest.mark.parametrize("source", [EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_from_config_of_a_non_clipping_scheduler_does_not_clip(source):
    """Euler / DPM-Solver configs have no clip_sample key and never clip x̂0; DDIM's default
    True used to be inherited, clamping latents to [-1, 1] at every step."""
    scheduler = S2NGeneralizedScheduler.from_config(source(beta_schedule="scaled_linear").config)
    assert scheduler.config.clip_sample is False
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[3]
    x0 = torch.full((1, 4, 2, 2), 3.0)  # latents are not in [-1, 1]
    bar = scheduler.alphas_cumprod[t]
    z = bar.sqrt() * x0
    out = scheduler.step(torch.zeros_like(z), t, z).pred_original_sample
    torch.testing.assert_close(out, x0)
    # a config that has the key, an explicit keyword and an empty config keep their value
    assert S2NGeneralizedScheduler.from_config(DDIMScheduler().config).config.clip_sample
    clipped = S2NGeneralizedScheduler.from_config(source().config, clip_sample=True)
    assert clipped.config.clip_sample is True
    assert S2NGeneralizedScheduler.from_config({}).config.clip_sample is True

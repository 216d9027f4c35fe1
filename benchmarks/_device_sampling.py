"""The S2N sampler's figures for :mod:`benchmarks.device_check` (a sampling method: no optimizer
step, so no fp16 loss scaling to check)."""

from __future__ import annotations

import contextlib

import torch

from benchmarks._device_steps import peak_memory_mib
from benchmarks.harness import compare
from hf_extensions.schedulers import S2NGeneralizedScheduler, run_denoising_loop

#: Stable Diffusion v1's noise schedule (its DDIM settings).
SD_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)  # fmt: skip
STEPS = 4


def unet(real: bool):
    """An SD v1.x UNet (4 levels 320-1280, cross-attention 768) at 32x32 latents, or a tiny one;
    random weights from seed 0, on the device."""
    from diffusers import UNet2DConditionModel

    shape = (
        dict(sample_size=32, cross_attention_dim=768)
        if real
        else dict(
            sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
            attention_head_dim=4,
        )
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = UNet2DConditionModel(**shape).eval()
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def _denoiser(model, batch: int, precision: str):
    device = model.device
    generator = torch.Generator().manual_seed(3)
    # host: drawn on the CPU so that every device sees the same prompt embedding
    text = torch.randn(batch, 77, model.config.cross_attention_dim, generator=generator)
    text = text.to(device)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )

    @torch.no_grad()
    def model_fn(z, t):
        with autocast:
            return model(z, t, encoder_hidden_states=text).sample.float()

    return model_fn


def _noise(model, batch: int) -> torch.Tensor:
    size = model.config.sample_size
    generator = torch.Generator().manual_seed(4)
    # host: the same starting noise on every device
    return torch.randn(batch, 4, size, size, generator=generator).to(model.device)


def _loop(scheduler, model, batch, precision, steps=STEPS) -> torch.Tensor:
    generator = torch.Generator(model.device).manual_seed(5)
    return run_denoising_loop(
        scheduler, _denoiser(model, batch, precision), _noise(model, batch), steps,
        generator=generator,
    )  # fmt: skip


def check_s2n(real: bool, batch: int, repeats: int) -> dict:
    """ρ = 0 against DDIM at η = 0 (bf16 UNet); ρ = 1 in bf16 against fp32; step times."""
    from diffusers import DDIMScheduler

    model = unet(real)
    ddim = DDIMScheduler(**SD_SCHEDULE)
    baseline_diff = float(
        (
            _loop(S2NGeneralizedScheduler(**SD_SCHEDULE, rho=0.0), model, batch, "bf16")
            - _loop(ddim, model, batch, "bf16")
        )
        .abs()
        .max()
    )
    s2n = S2NGeneralizedScheduler(**SD_SCHEDULE, rho=1.0)
    fp32 = _loop(s2n, model, batch, "fp32")
    bf16 = _loop(s2n, model, batch, "bf16")
    start = _noise(model, batch) * s2n.init_noise_sigma
    moved = float((fp32 - start).abs().max())
    bf16_diff = float((bf16 - fp32).abs().max())

    def one_step(scheduler):
        return lambda: _loop(scheduler, model, batch, "bf16", steps=1)

    timing = compare(one_step(ddim), {"s2n": one_step(s2n)}, warmup=2, repeats=repeats)
    _, peak = peak_memory_mib(one_step(s2n))
    return {
        "baseline_max_diff": baseline_diff,
        "baseline_ok": baseline_diff <= 1e-6,
        "bf16_vs_fp32_max_diff": bf16_diff,
        "fp32_step_size": moved,
        "bf16_ok": bool(torch.isfinite(bf16).all()) and bf16_diff <= 0.25 * moved,
        "fp16_overflow_skipped": None,  # sampling takes no optimizer step
        "step_ratio": timing["ratios"]["s2n"],
        "stock_step_ms": timing["baseline"].median * 1e3,
        "peak_memory_mib": peak,
        "stock_peak_memory_mib": None,
    }

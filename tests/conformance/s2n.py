"""Conformance case of the S2N scheduler (``S2NGeneralizedScheduler``). Baseline: ρ = 0 equals
diffusers' ``DDIMScheduler`` at η = 0 bit for bit (3 prediction types x 3 timestep spacings,
7 and 50 steps, with the exact denoiser of a 1-d Gaussian mixture); the control is ρ = 1.
Reload: a pipeline with the scheduler, by generation; no card (the scheduler's config records
it) and no two-process check (sampling trains nothing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from conformance.case import CONCEPT, Baseline, Case, Saved, bad, bad_values
from hf_extensions.models import tiny_stable_diffusion_pipeline
from hf_extensions.schedulers import GaussianMixture, S2NGeneralizedScheduler, run_denoising_loop

_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
_BIMODAL = GaussianMixture(weights=[0.3, 0.7], means=[[-1.0], [1.0]], stds=[0.25, 0.25])


def _exact_denoiser(scheduler, prediction_type: str):
    """The exact network of a 1-d Gaussian mixture (its posterior mean), element-wise, as a
    diffusers model output of ``prediction_type``."""
    bars = scheduler.alphas_cumprod.to(torch.float64)

    def model(z, t):
        bar = bars[int(t)]
        alpha, sigma = bar.sqrt(), (1 - bar).sqrt()
        x0 = _BIMODAL.posterior_mean(z.reshape(-1, 1), alpha, sigma).reshape(z.shape).to(z.dtype)
        eps = (z - alpha * x0) / sigma
        if prediction_type == "epsilon":
            return eps.to(z.dtype)
        if prediction_type == "sample":
            return x0
        return (alpha * eps - sigma * x0).to(z.dtype)

    return model


def _noise() -> torch.Tensor:
    return torch.randn((4, 3, 6, 6), generator=torch.Generator().manual_seed(0))


def _s2n_baseline(tmp_path: Path) -> Baseline:
    """ρ = 0 is diffusers' ``DDIMScheduler`` at η = 0, bit for bit: every prediction type and
    timestep spacing, 7 steps (off DDIM's t − T//n grid for linspace / trailing) and 50.
    Control: ρ = 1 (stochastic) against the same DDIM runs."""
    del tmp_path
    result = Baseline({}, {}, {})
    for prediction_type in ("epsilon", "sample", "v_prediction"):
        for spacing in ("leading", "trailing", "linspace"):
            config = {
                **_SD_BETAS,
                "prediction_type": prediction_type,
                "timestep_spacing": spacing,
                "clip_sample": False,
            }
            ddim = DDIMScheduler(**config)
            model = _exact_denoiser(ddim, prediction_type)
            for steps in (7, 50):
                key = f"{prediction_type}/{spacing}/{steps}"
                result.stock[key] = run_denoising_loop(ddim, model, _noise(), steps)
                for name, rho in (("method", 0.0), ("control", 1.0)):
                    s2n = S2NGeneralizedScheduler(**config, rho=rho)
                    generator = torch.Generator().manual_seed(1)
                    out = run_denoising_loop(s2n, model, _noise(), steps, generator=generator)
                    getattr(result, name)[key] = out
    return result


def _s2n_images(pipe):
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        CONCEPT,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    scheduler = pipe.scheduler
    return {
        "images": torch.from_numpy(np.ascontiguousarray(images)),
        "is_s2n": torch.tensor(type(scheduler) is S2NGeneralizedScheduler),
        "rho": torch.tensor(float(scheduler.config.rho)),
        "s_noise": torch.tensor(float(scheduler.config.s_noise)),
    }


def _s2n_save(directory: Path) -> Saved:
    pipe = tiny_stable_diffusion_pipeline()
    pipe.scheduler = S2NGeneralizedScheduler.from_config(
        pipe.scheduler.config, rho=0.7, s_noise=0.9
    )
    pipe.save_pretrained(directory)
    return Saved(_s2n_images(pipe))


def _s2n_reload(directory: Path):
    return _s2n_images(DiffusionPipeline.from_pretrained(directory))


S2N = Case(
    id="s2n-scheduler",
    baseline=_s2n_baseline,
    save=_s2n_save,
    reload=_s2n_reload,
    bad_configs=(
        *bad_values(
            S2NGeneralizedScheduler,
            {},
            [
                ("rho", -0.1),
                ("rho", float("nan")),
                ("s_noise", -1.0),
                ("solver_order", 3),
                ("prediction_type", "flow_prediction"),
                ("timestep_spacing", "karras"),
                ("prev_timestep_rule", "previous"),
                ("beta_schedule", "cubic"),
                ("beta_start", float("nan")),
                ("beta_end", float("inf")),
                ("clip_sample_range", float("nan")),
                ("sample_max_value", -1.0),
                ("num_train_timesteps", 1),
                ("dynamic_thresholding_ratio", 0.0),
            ],
        ),
        bad("rho_t_max", lambda: S2NGeneralizedScheduler(rho_t_min=500, rho_t_max=100), 100),
    ),
    not_applicable={
        "card": "a scheduler is saved as scheduler_config.json (class, rho, every setting; "
        "checked by the reload case); the pipeline card is written by recipes/s2n",
        "two_processes": "sampling only: no parameters are trained, so there is nothing for "
        "processes to all-reduce",
    },
)

"""S2N generalized backward scheduler: Wasserstein error vs steps vs ρ, against DDIM, and step cost.

Doan et al., "Connective Viewpoints of Signal-to-Noise Diffusion Models" (arXiv 2408.04221):
the backward family dz = [f z − (1+ρ²)/2 g² ∇log p] dt + ρ g dW̄ keeps the data marginals for
every ρ; ρ = 0 is DDIM (eta 0). This benchmark samples Gaussian mixtures, whose posterior mean
(the optimal denoiser) is exact, with ``S2NGeneralizedScheduler`` over a grid of ρ and numbers
of steps, and with ``diffusers.DDIMScheduler`` (eta 0) as the reference, all in one run:

- data: a 1-D two-component mixture (weights 0.3 / 0.7, means ∓1, std 0.25) and the 2-D
  "8 Gaussians" (equal weights, means on the unit circle, std 0.1);
- model: ε-prediction on the DDPM linear schedule (β 1e-4 … 0.02, T = 1000, trailing spacing,
  no clipping); the exact ε(z, t) = (z − α E[x|z]) / σ, and biased versions ε̂ = c · ε with
  c = 1.1 (``biased``, both data sets) and c = 0.9 (``biased_0.9``, 1-D);
- error: W1 between the samples and exact draws: ``scipy.stats.wasserstein_distance`` in 1-D
  (against 20 000 quantiles of the mixture), POT's exact ``ot.emd2`` in 2-D (against as many exact draws
  as samples). ``floor`` is the W1 of a fresh exact sample, the sampling-noise level;
- cost: ``step`` time of the scheduler against ``DDIMScheduler.step`` on a Stable Diffusion
  latent (1×4×64×64), timed interleaved: ρ = 0 vs DDIM eta 0 and ρ = 1 vs DDIM eta 1;
- the information-theoretic panel: mmse(SNR) of each data set (exact posterior mean) under
  the Gaussian bound, and the MSE of the biased denoisers.

Run: ``python -m benchmarks.s2n`` (about a minute on two CPU cores).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import ot
import torch
from diffusers import DDIMScheduler
from scipy.stats import wasserstein_distance

from benchmarks.harness import (
    BenchmarkReport,
    compare,
    get_pyplot,
    make_parser,
    mean_std,
    save_plot,
    torch_threads,
)
from hf_extensions.schedulers import (
    GaussianMixture,
    S2NGeneralizedScheduler,
    excess_mse,
    gaussian_mmse,
    i_mmse_mutual_information,
    mmse,
    mutual_information,
    run_denoising_loop,
)

NAME = "s2n"
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": False,
    "set_alpha_to_one": True,
    "timestep_spacing": "trailing",
    "prediction_type": "epsilon",
}
DENOISERS = {"exact": 1.0, "biased": 1.1, "biased_0.9": 0.9}
DENOISERS_2D = ("exact", "biased")
REFERENCE_SIZE_1D = 20_000


def mixture_1d() -> GaussianMixture:
    return GaussianMixture(weights=[0.3, 0.7], means=[[-1.0], [1.0]], stds=[0.25, 0.25])


def mixture_2d() -> GaussianMixture:
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(weights=torch.ones(8), means=means, stds=torch.full((8,), 0.1))


def epsilon_model(data: GaussianMixture, alphas_cumprod: torch.Tensor, scale: float):
    """ε(z, t) of the exact posterior mean, times ``scale`` (1: exact; else biased)."""
    bars = alphas_cumprod.to(torch.float64)

    def model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        bar = bars[int(t)]
        alpha, sigma = bar.sqrt(), (1 - bar).sqrt()
        eps = (z - alpha * data.posterior_mean(z, alpha, sigma)) / sigma
        return scale * eps

    return model


def quantile_reference(data: GaussianMixture, size: int) -> torch.Tensor:
    """The 1-D mixture's quantiles at (i + ½)/size: a sample-free stand-in for the data.

    W1 against it differs from W1 against the exact distribution by at most the quantisation
    error (about spread / size), with no sampling noise. The CDF is inverted by bisection.
    """
    levels = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    means, stds = data.means[:, 0], data.stds
    lo = torch.full_like(levels, float((means - 12 * stds).min()))
    hi = torch.full_like(levels, float((means + 12 * stds).max()))
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        cdf = (data.weights * torch.special.ndtr((mid[:, None] - means) / stds)).sum(1)
        below = cdf < levels
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (0.5 * (lo + hi)).unsqueeze(1)


def w1(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """W1 between two sample sets: scipy in 1-D, POT's exact OT (ot.emd2) otherwise."""
    a, b = samples.double().numpy(), reference.double().numpy()
    if a.shape[1] == 1:
        return float(wasserstein_distance(a[:, 0], b[:, 0]))
    cost = ot.dist(a, b, metric="euclidean")
    return float(ot.emd2(np.empty(0), np.empty(0), cost, numItermax=10**7))


def sample(
    scheduler, model, num_samples: int, dim: int, steps: int, seed: int, **step_kwargs
) -> torch.Tensor:
    """The pipeline loop with ``scheduler``; the same initial noise and step noise per seed."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_samples, dim, generator=generator, dtype=torch.float64)
    return run_denoising_loop(scheduler, model, noise, steps, generator=generator, **step_kwargs)


def sweep(args) -> tuple[dict[tuple, list[float]], dict[str, list[float]], float]:
    """W1 for every (data, denoiser, sampler, steps, seed).

    Returns the grid, the sampling floors, and the largest |sample(ρ = 0) − sample(DDIM)|.
    """
    datasets = {"1d": (mixture_1d(), args.samples_1d), "2d": (mixture_2d(), args.samples_2d)}
    ddim = DDIMScheduler(**SCHEDULE)
    samplers: dict[str, Any] = {"ddim": ddim}
    for rho in args.rhos:
        samplers[f"rho{rho:g}"] = S2NGeneralizedScheduler(**SCHEDULE, rho=rho)
    grid: dict[tuple, list[float]] = {}
    floors: dict[str, list[float]] = {}
    ddim_outputs: dict[tuple, torch.Tensor] = {}
    rho0_vs_ddim = 0.0
    for key, (data, size) in datasets.items():
        references = []
        floors[key] = []
        for seed in args.seeds:
            generator = torch.Generator().manual_seed(10_000 + seed)
            if key == "1d":
                if not references:
                    references.append(quantile_reference(data, REFERENCE_SIZE_1D))
                reference = references[0]
            else:
                reference = data.sample(size, generator=generator)
                references.append(reference)
            fresh = data.sample(size, generator=torch.Generator().manual_seed(20_000 + seed))
            floors[key].append(w1(fresh, reference))
        names = DENOISERS if key == "1d" else DENOISERS_2D
        for denoiser in names:
            model = epsilon_model(data, ddim.alphas_cumprod, DENOISERS[denoiser])
            for sampler_name, scheduler in samplers.items():
                for steps in args.steps:
                    values = []
                    for i, seed in enumerate(args.seeds):
                        out = sample(scheduler, model, size, data.dim, steps, seed)
                        cell = (key, denoiser, steps, seed)
                        if sampler_name == "ddim":
                            ddim_outputs[cell] = out
                        elif sampler_name == "rho0":
                            # rho = 0 is DDIM: check it on every cell, reuse DDIM's (costly) W1.
                            difference = float((out - ddim_outputs[cell]).abs().max())
                            rho0_vs_ddim = max(rho0_vs_ddim, difference)
                            values.append(grid[(key, denoiser, "ddim", steps)][i])
                            continue
                        reference = references[0] if key == "1d" else references[i]
                        values.append(w1(out, reference))
                    grid[(key, denoiser, sampler_name, steps)] = values
    return grid, floors, rho0_vs_ddim


def time_steps(args) -> dict[str, Any]:
    """Median ``step`` times, interleaved: S2N ρ=0 vs DDIM eta 0, S2N ρ=1 vs DDIM eta 1."""
    config = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }
    ddim = DDIMScheduler(**config)
    s2n0 = S2NGeneralizedScheduler(**config, rho=0.0)
    s2n1 = S2NGeneralizedScheduler(**config, rho=1.0)
    for scheduler in (ddim, s2n0, s2n1):
        scheduler.set_timesteps(50)
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, 64, 64, generator=generator)
    output = torch.randn(1, 4, 64, 64, generator=generator)
    t = ddim.timesteps[25]
    results = {}
    for rho, (baseline, candidate) in {
        0: (lambda: ddim.step(output, t, latent), lambda: s2n0.step(output, t, latent)),
        1: (
            lambda: ddim.step(output, t, latent, eta=1.0, generator=generator),
            lambda: s2n1.step(output, t, latent, generator=generator),
        ),
    }.items():
        results[rho] = compare(
            baseline,
            {"s2n": candidate},
            warmup=args.timing_warmup,
            repeats=args.timing_repeats,
            number=args.timing_number,
        )
    return results


def mmse_panel(args) -> dict[str, Any]:
    """mmse(SNR) of both mixtures, their Gaussian bound, the biased denoisers' MSE, and an
    I-MMSE check (1-D: I from the entropy of y against ½ ∫ mmse)."""
    log_snr = np.linspace(-6, 8, args.mmse_points)
    snr = np.exp(log_snr)
    panel: dict[str, Any] = {"log_snr": log_snr.tolist()}
    for key, data in {"1d": mixture_1d(), "2d": mixture_2d()}.items():
        generator = torch.Generator().manual_seed(0)
        exact = mmse(data, snr, n=args.mmse_samples, generator=generator)
        bound = gaussian_mmse(snr, torch.linalg.eigvalsh(data.covariance()))
        panel[f"mmse_{key}"] = exact.tolist()
        panel[f"gaussian_bound_{key}"] = bound.tolist()
        for denoiser in ("biased", "biased_0.9") if key == "1d" else ("biased",):
            scale = DENOISERS[denoiser]

            def biased(z, alpha, sigma, data=data, scale=scale):
                x0 = data.posterior_mean(z, alpha, sigma)
                return (z - scale * (z - alpha * x0)) / alpha  # x̂0 of ε̂ = scale · ε

            excess = [
                excess_mse(data, biased, float(g), n=args.mmse_samples, generator=generator)
                for g in snr
            ]
            panel[f"mse_{denoiser}_{key}"] = (exact + torch.tensor(excess)).tolist()
    # I-MMSE on the 1-D mixture: both sides are deterministic quadratures there.
    data = mixture_1d()
    snr_grid = np.concatenate([[0.0], np.geomspace(1e-3, 50.0, 200)])
    direct = mutual_information(data, snr_grid)
    integral = i_mmse_mutual_information(snr_grid, mmse(data, snr_grid))
    panel["i_mmse_max_abs_diff_1d_nats"] = float((direct - integral).abs().max())
    panel["mutual_information_1d_at_snr50_nats"] = float(direct[-1])
    return panel


def summarize(grid, floors, args) -> dict[str, Any]:
    """metrics.<denoiser>.<sampler> = {w1_<steps>: mean, w1_<steps>_seeds: [...], 2-D too}."""
    metrics: dict[str, Any] = {}
    sampler_names = ["ddim", *[f"rho{rho:g}" for rho in args.rhos]]
    for denoiser in DENOISERS:
        rows: dict[str, Any] = {}
        for name in sampler_names:
            row: dict[str, Any] = {}
            for key, prefix in (("1d", "w1"), ("2d", "w1_2d")):
                for steps in args.steps:
                    values = grid.get((key, denoiser, name, steps))
                    if values is None:
                        continue
                    row[f"{prefix}_{steps}"] = mean_std(values)[0]
                    row[f"{prefix}_{steps}_seeds"] = values
            rows[name] = row
        best = min(
            (name for name in sampler_names if name != "ddim"),
            key=lambda name: rows[name].get("w1_50", math.inf),
        )
        rows["rho_best"] = {"rho": float(best[3:]), **rows[best]}
        metrics[denoiser] = rows
    metrics["floor"] = {
        "w1": mean_std(floors["1d"])[0],
        "w1_seeds": floors["1d"],
        "w1_2d": mean_std(floors["2d"])[0],
        "w1_2d_seeds": floors["2d"],
    }
    return metrics


def format_grid(metrics, args) -> str:
    """Error vs steps vs ρ, one block per (data set, denoiser)."""
    lines = []
    sampler_names = ["ddim", *[f"rho{rho:g}" for rho in args.rhos]]
    for key, prefix in (("1-D", "w1"), ("2-D", "w1_2d")):
        for denoiser in DENOISERS:
            rows = metrics[denoiser]
            if f"{prefix}_{args.steps[0]}" not in rows["ddim"]:
                continue
            lines.append(f"W1, {key} mixture, {denoiser} denoiser (rows: sampler, columns: steps)")
            lines.append("  " + "sampler".ljust(8) + "".join(f"{s:>10d}" for s in args.steps))
            for name in sampler_names:
                values = "".join(f"{rows[name][f'{prefix}_{s}']:>10.4f}" for s in args.steps)
                lines.append("  " + name.ljust(8) + values)
    return "\n".join(lines)


def plot(metrics, panel, ratios, args, results_dir) -> None:
    try:
        plt = get_pyplot()
    except ImportError as error:
        print(f"no plot: {error}")
        return
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(args.rhos)))
    panels = [
        ("w1", "exact", "1-D, exact denoiser"),
        ("w1", "biased", "1-D, biased ε̂ = 1.1 ε"),
        ("w1", "biased_0.9", "1-D, biased ε̂ = 0.9 ε"),
        ("w1_2d", "exact", "2-D (8 Gaussians), exact"),
        ("w1_2d", "biased", "2-D (8 Gaussians), ε̂ = 1.1 ε"),
    ]
    for ax, (prefix, denoiser, title) in zip(axes.flat, panels):
        rows = metrics[denoiser]
        for color, rho in zip(colors, args.rhos):
            ax.plot(
                args.steps,
                [rows[f"rho{rho:g}"][f"{prefix}_{s}"] for s in args.steps],
                "o-",
                color=color,
                label=f"ρ = {rho:g}",
            )
        ax.plot(
            args.steps,
            [rows["ddim"][f"{prefix}_{s}"] for s in args.steps],
            "k--",
            marker="x",
            label="DDIM (eta 0)",
        )
        floor = metrics["floor"]["w1" if prefix == "w1" else "w1_2d"]
        ax.axhline(floor, color="grey", lw=0.8, ls=":", label="sampling floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("steps")
        ax.set_ylabel("W1 to the data")
        ax.set_title(title, fontsize=9)
    axes.flat[0].legend(fontsize=7)
    ax = axes.flat[5]
    log_snr = panel["log_snr"]
    curves = [
        ("mmse_1d", "C0", "-", "exact, 1-D"),
        ("mmse_2d", "C0", "--", "exact, 2-D"),
        # ε̂ = 0.9 ε has the same excess (σ/α)² · 0.01 · E‖ε̂‖² as 1.1 ε: one curve.
        ("mse_biased_1d", "C3", "-", "ε̂ = 1.1 ε (or 0.9 ε), 1-D"),
        ("mse_biased_2d", "C3", "--", "ε̂ = 1.1 ε, 2-D"),
    ]
    for name, color, style, label in curves:
        bound = np.asarray(panel[f"gaussian_bound_{name[-2:]}"])
        ax.plot(log_snr, np.asarray(panel[name]) / bound, style, color=color, label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":", label="Gaussian data (bound)")
    ax.set_yscale("log")
    ax.set_xlabel("log SNR")
    ax.set_ylabel("E‖x − x̂0‖² / Gaussian MMSE")
    ax.set_title(
        f"denoiser MSE vs SNR (exact = mmse; I-MMSE check "
        f"{panel['i_mmse_max_abs_diff_1d_nats']:.1e} nats)\nstep cost vs DDIM: "
        f"ρ=0 {ratios['step_vs_ddim_rho0']:.2f}x, ρ=1 {ratios['step_vs_ddim_rho1']:.2f}x",
        fontsize=8,
    )
    ax.legend(fontsize=6)
    fig.suptitle(
        "S2NGeneralizedScheduler: W1 error vs steps vs ρ (DDPM linear schedule, trailing)",
        fontsize=10,
    )
    fig.tight_layout()
    print(f"wrote {save_plot(fig, NAME, results_dir)}")


def main(argv: list[str] | None = None) -> BenchmarkReport:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samples-1d", type=int, default=10_000)
    parser.add_argument("--samples-2d", type=int, default=1000)
    parser.add_argument("--mmse-points", type=int, default=29)
    parser.add_argument("--mmse-samples", type=int, default=20_000)
    parser.add_argument("--timing-repeats", type=int, default=30)
    parser.add_argument("--timing-warmup", type=int, default=5)
    parser.add_argument("--timing-number", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: as is)")
    args = parser.parse_args(argv)
    if 50 not in args.steps or 1.0 not in args.rhos or 0.0 not in args.rhos:
        parser.error("--steps must include 50 and --rhos must include 0 and 1 (the claims).")
    with torch_threads(args.threads):
        return _run(args)


def _run(args) -> BenchmarkReport:
    start = time.perf_counter()
    grid, floors, rho0_vs_ddim = sweep(args)
    sweep_seconds = time.perf_counter() - start
    metrics = summarize(grid, floors, args)
    metrics["rho0_vs_ddim"] = {"max_abs_sample_diff": rho0_vs_ddim}
    timing = time_steps(args)
    metrics["step_cost"] = {
        "ddim_eta0": timing[0]["baseline"].metrics(unit="us", prefix="step_"),
        "rho0": timing[0]["candidates"]["s2n"].metrics(unit="us", prefix="step_"),
        "ddim_eta1": timing[1]["baseline"].metrics(unit="us", prefix="step_"),
        "rho1": timing[1]["candidates"]["s2n"].metrics(unit="us", prefix="step_"),
    }
    panel = mmse_panel(args)
    metrics["mmse"] = panel
    ratio0, ratio1 = timing[0]["ratios"]["s2n"], timing[1]["ratios"]["s2n"]
    ratios = {
        "step_vs_ddim": max(ratio0, ratio1),
        "step_vs_ddim_rho0": ratio0,
        "step_vs_ddim_rho1": ratio1,
        "biased_rho1_vs_ddim_w1_50": metrics["biased"]["rho1"]["w1_50"]
        / metrics["biased"]["ddim"]["w1_50"],
        "biased_rho1_vs_ddim_w1_2d_50": metrics["biased"]["rho1"]["w1_2d_50"]
        / metrics["biased"]["ddim"]["w1_2d_50"],
        "biased_0.9_rho1_vs_ddim_w1_50": metrics["biased_0.9"]["rho1"]["w1_50"]
        / metrics["biased_0.9"]["ddim"]["w1_50"],
        "exact_rho_best_vs_ddim_w1_50": metrics["exact"]["rho_best"]["w1_50"]
        / metrics["exact"]["ddim"]["w1_50"],
        "exact_rho1_vs_ddim_w1_50": metrics["exact"]["rho1"]["w1_50"]
        / metrics["exact"]["ddim"]["w1_50"],
    }
    report = BenchmarkReport(
        name=NAME,
        metrics=metrics,
        ratios=ratios,
        config={
            "schedule": SCHEDULE,
            "data_1d": "0.3 N(-1, 0.25^2) + 0.7 N(1, 0.25^2)",
            "data_2d": "8 Gaussians on the unit circle, std 0.1, equal weights",
            "denoisers": {
                name: f"eps_hat = {scale} * exact eps" for name, scale in DENOISERS.items()
            },
            "rhos": args.rhos,
            "steps": args.steps,
            "seeds": args.seeds,
            "samples_1d": args.samples_1d,
            "samples_2d": args.samples_2d,
            "reference_1d": REFERENCE_SIZE_1D,
            "w1": "scipy.stats.wasserstein_distance (1-D), ot.emd2 euclidean (2-D)",
            "timing": {
                "latent": [1, 4, 64, 64],
                "schedule": "Stable Diffusion scaled_linear, 50 steps, leading",
                "repeats": args.timing_repeats,
                "number": args.timing_number,
            },
            "sweep_seconds": sweep_seconds,
        },
        notes=(
            "metrics.<denoiser>.<sampler>.w1_<steps> is the mean over seeds of W1 on the 1-D "
            "mixture, w1_2d_<steps> on the 2-D one (lists per seed beside them); ddim is "
            "diffusers.DDIMScheduler (eta 0); rho_best is the grid's best rho by 1-D W1 at 50 "
            "steps. floor is the W1 of a fresh exact sample of the same size (sampling noise). "
            "rho0 samples are compared with DDIM's on every cell (rho0_vs_ddim) and share its "
            "W1. Step times are medians in microseconds on the machine named above; ratios are "
            "S2N / DDIM measured interleaved in this run."
        ),
    )
    print(format_grid(metrics, args))
    print(f"max |sample(rho=0) - sample(DDIM)| over the grid: {rho0_vs_ddim:.3g}")
    print(
        f"floor: 1-D {metrics['floor']['w1']:.4f}, 2-D {metrics['floor']['w1_2d']:.4f}; "
        f"best rho (exact, 1-D, 50 steps): {metrics['exact']['rho_best']['rho']:g}"
    )
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.3f}")
    from benchmarks.s2n_fixture import write_gaussian_mixture  # keeps the fixture's result

    print(f"wrote {write_gaussian_mixture(report, args.results_dir)}")
    plot(metrics, panel, ratios, args, args.results_dir)
    return report


if __name__ == "__main__":
    main()

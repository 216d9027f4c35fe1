"""FHBI vs SVGD vs deep ensemble vs a single AdamW model on digits; particle-evaluation cost.

Quality (3 seeds): scikit-learn's digits (vector layout, offline), m = 4 particles, each a full
64-64-10 MLP (every particle tensor is an ``nn.Linear``'s, so the particles run stacked), trained
by :class:`trainers.FHBITrainer` with the same optimizer (AdamW), epochs, batches and seeds:

- ``fhbi``: ``rho`` > 0, RBF kernel (median bandwidth, global scope), repulsive sign;
- ``svgd``: the same with ``rho = 0``;
- ``ensemble``: ``kernel="none"`` (K = I, no repulsion), ``rho = 0``: a deep ensemble;
- ``adamw``: one particle, ``rho = 0``, no kernel: a plain single model.

Reported on the test split: accuracy, NLL and ECE of the particle-averaged prediction, and
sharpness: the mean increase of each particle's training loss when Gaussian noise
N(0, ``sigma``²) is added to every weight of that particle (``draws`` draws, fixed seed; both
stated in the JSON), averaged over particles and draws.

Cost (one process, interleaved timing with :func:`benchmarks.harness.compare`): one FHBI
optimizer step of 4 LoRA particles (r=8 on q/v + heads) over a tiny ViT, with the particles
stacked vs looped (``ratios.vectorized_vs_loop``); the step with the kernel vs without it
(``ratios.kernel_overhead``); FHBI vs SVGD, and SVGD vs m single-model steps.

Run: ``python -m benchmarks.fhbi`` (6-8 minutes on 2 busy CPU cores); ``--quick`` for a
seconds-long smoke run (results written with ``_quick`` in the name).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model

from benchmarks.harness import (
    BenchmarkReport,
    compare,
    get_pyplot,
    make_parser,
    mean_std,
    quiet_training_arguments,
    save_plot,
    time_callable,
    torch_threads,
)
from hf_extensions.data import load_digits
from hf_extensions.fhbi.particles import ParticleEnsemble
from hf_extensions.metrics.functional import (
    accuracy,
    expected_calibration_error,
    negative_log_likelihood,
)
from hf_extensions.models import tiny_mlp_classifier, tiny_vit_classifier
from trainers.fhbi_config import FHBIConfig
from trainers.fhbi_trainer import FHBITrainer

NAME = "fhbi"
METHODS = ("fhbi", "svgd", "ensemble", "adamw")


@dataclass(frozen=True)
class Settings:
    """One configuration shared by every method (fixed before any result was seen)."""

    num_particles: int = 4
    hidden_sizes: tuple[int, ...] = (64,)
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 3e-3
    rho: float = 0.05
    ascent_norm: str = "block"
    kernel_scope: str = "global"
    sharpness_sigma: float = 0.02
    sharpness_draws: int = 20
    seeds: tuple[int, ...] = (0, 1, 2)
    timing_repeats: int = 30


QUICK = Settings(epochs=1, seeds=(0,), sharpness_draws=2, timing_repeats=3)


def _method_args(method: str, settings: Settings) -> dict[str, Any]:
    m = settings.num_particles
    return {
        "fhbi": dict(num_particles=m, rho=settings.rho, kernel="rbf"),
        "svgd": dict(num_particles=m, rho=0.0, kernel="rbf"),
        "ensemble": dict(num_particles=m, rho=0.0, kernel="none"),
        "adamw": dict(num_particles=1, rho=0.0, kernel="none"),
    }[method]


def _config(output_dir: str, method: str, settings: Settings, seed: int, **extra) -> FHBIConfig:
    return FHBIConfig(
        **quiet_training_arguments(
            output_dir,
            num_train_epochs=settings.epochs,
            per_device_train_batch_size=settings.batch_size,
            optim="adamw_torch",
            learning_rate=settings.learning_rate,
            weight_decay=0.0,
            lr_scheduler_type="cosine",
            seed=seed,
            disable_tqdm=True,
            **extra,
        ),
        ascent_norm=settings.ascent_norm,
        kernel_scope=settings.kernel_scope,
        **_method_args(method, settings),
    )


def _columns(split) -> tuple[torch.Tensor, torch.Tensor]:
    columns = split.with_format("torch")[:]
    return columns["features"].float(), columns["labels"]


@torch.no_grad()
def sharpness(ensemble: ParticleEnsemble, features, labels, sigma: float, draws: int, seed: int):
    """Mean over particles and draws of L_i(θ_i + δ) - L_i(θ_i), δ ~ N(0, σ² I) on every particle
    tensor (each particle gets its own draw)."""
    ensemble.eval()

    def losses() -> torch.Tensor:
        logits = ensemble.particle_logits(features=features)
        m = logits.shape[0]
        flat = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.repeat(m), reduction="none"
        )
        return flat.view(m, -1).mean(1)

    base = losses()
    generator = torch.Generator().manual_seed(seed)
    saved = [p.detach().clone() for p in ensemble.particles]
    increases = []
    for _ in range(draws):
        for p in ensemble.particles:
            p.add_(sigma * torch.randn(p.shape, generator=generator))
        increases.append(losses() - base)
        for p, s in zip(ensemble.particles, saved):
            p.copy_(s)
    return float(torch.stack(increases).mean())


def run_quality(settings: Settings) -> dict[str, dict[str, list[float]]]:
    results = {m: {k: [] for k in ("accuracy", "nll", "ece", "sharpness")} for m in METHODS}
    for seed in settings.seeds:
        data = load_digits(seed=seed, layout="vector")
        train = data["train"].select_columns(["features", "labels"])
        test_x, test_y = _columns(data["test"])
        train_x, train_y = _columns(train)
        for method in METHODS:
            config = _method_args(method, settings)
            model = tiny_mlp_classifier(hidden_sizes=settings.hidden_sizes, seed=seed)
            ensemble = ParticleEnsemble(model, config["num_particles"], seed=seed)
            with tempfile.TemporaryDirectory() as out:
                args = _config(out, method, settings, seed)
                FHBITrainer(model=ensemble, args=args, train_dataset=train).train()
            ensemble.eval()
            with torch.no_grad():
                log_probs = ensemble(features=test_x)["logits"].numpy()
            probs = np.exp(log_probs)
            y = test_y.numpy()
            results[method]["accuracy"].append(accuracy(probs.argmax(-1), y))
            results[method]["nll"].append(negative_log_likelihood(probs, y))
            results[method]["ece"].append(expected_calibration_error(probs, y))
            results[method]["sharpness"].append(
                sharpness(
                    ensemble,
                    train_x,
                    train_y,
                    settings.sharpness_sigma,
                    settings.sharpness_draws,
                    seed=1000 + seed,
                )
            )
            print(
                method, seed, {k: round(v[-1], 4) for k, v in results[method].items()}, flush=True
            )
    return results


def _lora_ensemble(m: int, mode: str) -> ParticleEnsemble:
    config = LoraConfig(
        r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft = get_peft_model(tiny_vit_classifier(), config)
    return ParticleEnsemble(peft, m, mode=mode)


def _step_fn(ensemble: ParticleEnsemble, out: str, settings: Settings, **method):
    """One synchronised FHBI step outside ``train()``: training_step, the kernel rewrite (the
    pre-optimizer-step callback), optimizer and scheduler steps, zero_grad."""
    args = FHBIConfig(
        **quiet_training_arguments(out, optim="adamw_torch", learning_rate=1e-3, max_grad_norm=0.0),
        kernel_scope=settings.kernel_scope,
        **method,
    )
    trainer = FHBITrainer(model=ensemble, args=args)
    trainer.create_optimizer()
    model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.create_scheduler(num_training_steps=10_000)
    trainer.model_wrapped = model
    trainer.current_gradient_accumulation_steps = 1

    def step(inputs):
        loss = trainer.training_step(model, inputs)
        trainer.apply_kernel()
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        return loss

    step.trainer = trainer
    return step


def run_timing(settings: Settings) -> dict[str, Any]:
    m = settings.num_particles
    data = load_digits(seed=0)["train"].select(range(32)).with_format("torch")[:]
    inputs = {"pixel_values": data["pixel_values"].float(), "labels": data["labels"]}
    rho = settings.rho
    with tempfile.TemporaryDirectory() as out:
        steps = {
            "fhbi_loop": _step_fn(
                _lora_ensemble(m, "loop"), out, settings, num_particles=m, rho=rho
            ),
            "fhbi_no_kernel": _step_fn(
                _lora_ensemble(m, "stacked"), out, settings, num_particles=m, rho=rho, kernel="none"
            ),
            "svgd": _step_fn(_lora_ensemble(m, "stacked"), out, settings, num_particles=m, rho=0.0),
            "single": _step_fn(
                _lora_ensemble(1, "stacked"), out, settings, num_particles=1, rho=0.0, kernel="none"
            ),
        }
        baseline = _step_fn(_lora_ensemble(m, "stacked"), out, settings, num_particles=m, rho=rho)
        timed = compare(
            lambda: baseline(inputs),
            {name: (lambda s=s: s(inputs)) for name, s in steps.items()},
            warmup=3,
            repeats=settings.timing_repeats,
        )
        # The kernel step alone (pairwise distances, median, K g - r for every tensor), on the
        # baseline's particles with gradients present: its cost relative to a step without it.
        trainer = baseline.trainer
        for p in trainer.model.particles:
            p.grad = torch.randn_like(p)
        kernel_alone = time_callable(
            trainer.apply_kernel, warmup=3, repeats=settings.timing_repeats, number=10
        )
        for p in trainer.model.particles:
            p.grad = None
    base = timed["baseline"].median
    ratios = {
        "vectorized_vs_loop": base / timed["candidates"]["fhbi_loop"].median,
        "kernel_overhead": 1.0 + kernel_alone.median / timed["candidates"]["fhbi_no_kernel"].median,
        "kernel_overhead_end_to_end": base / timed["candidates"]["fhbi_no_kernel"].median,
        "fhbi_vs_svgd": base / timed["candidates"]["svgd"].median,
        "svgd_vs_m_single_steps": timed["candidates"]["svgd"].median
        / (m * timed["candidates"]["single"].median),
    }
    metrics = {
        "fhbi_step": timed["baseline"].metrics("ms"),
        "kernel_alone": kernel_alone.metrics("ms"),
    }
    metrics.update({name: r.metrics("ms") for name, r in timed["candidates"].items()})
    return {"ratios": ratios, "metrics": metrics}


def _plot(results, timing, settings, results_dir, name):
    plt = get_pyplot()
    fig, axes = plt.subplots(
        1, 5, figsize=(20, 3.4), gridspec_kw={"width_ratios": [1, 1, 1, 1, 1.2], "wspace": 0.35}
    )
    for ax, metric in zip(axes, ("accuracy", "nll", "ece", "sharpness")):
        means = [mean_std(results[m][metric])[0] for m in METHODS]
        stds = [mean_std(results[m][metric])[1] for m in METHODS]
        ax.bar(METHODS, means, yerr=stds, color=["C3", "C0", "C2", "C7"])
        ax.set_title(metric + (f" (σ={settings.sharpness_sigma})" if metric == "sharpness" else ""))
        ax.tick_params(axis="x", rotation=30)
    labels = list(timing["ratios"])
    values = [timing["ratios"][k] for k in labels]
    axes[4].barh(range(len(labels)), values, color="C0")
    for y, (label, value) in enumerate(zip(labels, values)):
        axes[4].text(value + 0.03, y, f"{label} {value:.2f}", va="center", fontsize=8)
    axes[4].set_yticks([])
    axes[4].set_xlim(0, 2 * max(values) + 0.5)
    axes[4].axvline(1.0, color="k", lw=0.8)
    axes[4].set_title("step-time ratios")
    return save_plot(fig, name, results_dir)


def main(argv: list[str] | None = None) -> BenchmarkReport:
    with torch_threads(1):  # tiny models: extra threads only wait for a busy core here
        return _main(argv)


def _main(argv: list[str] | None = None) -> BenchmarkReport:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    name = NAME + ("_quick" if args.quick else "")
    timing = run_timing(settings)
    results = run_quality(settings)
    sharp = {m: mean_std(results[m]["sharpness"])[0] for m in METHODS}
    ratios = dict(timing["ratios"])
    ratios["sharpness_fhbi_vs_svgd"] = sharp["fhbi"] / sharp["svgd"]
    metrics: dict[str, dict[str, Any]] = {m: dict(results[m]) for m in METHODS}
    metrics["timing_ms"] = {
        f"{k}_{stat}": v for k, d in timing["metrics"].items() for stat, v in d.items()
    }
    report = BenchmarkReport(
        name=name,
        metrics=metrics,
        ratios=ratios,
        config={
            **asdict(settings),
            "timing_model": "tiny ViT (2 layers, width 32), LoRA r=8 on "
            "q_proj/v_proj + head per particle, batch 32, AdamW",
            "quality_model": f"MLP 64-{settings.hidden_sizes}-10, full-parameter particles",
            "sharpness": "mean over particles and draws of the increase of each particle's "
            "training loss under N(0, sigma^2) noise on all its weights",
            "threads": 1,
        },
        notes=(
            "Per-seed lists for metrics; ratios: step-time medians measured interleaved in this "
            "run (vectorized_vs_loop = stacked / loop FHBI step; kernel_overhead = 1 + (kernel "
            "step alone, timed directly) / (FHBI step without kernel); kernel_overhead_end_to_end = "
            "with / without the kernel, whole steps timed interleaved (noisier than the kernel's "
            "cost on this shared machine); svgd_vs_m_single_steps = SVGD step / (m x one single-"
            "model step)); sharpness_fhbi_vs_svgd = ratio of the 3-seed means."
        ),
    )
    report.write(args.results_dir)
    report.print_table()
    _plot(results, timing, settings, args.results_dir, name)
    return report


if __name__ == "__main__":
    main()

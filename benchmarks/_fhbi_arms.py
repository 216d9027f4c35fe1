"""The machinery of ``benchmarks/fhbi.py``: data, LoRA particles on the zoo ViT, one trained arm,
its scores (accuracy / NLL / ECE in-domain and under style shift, sharpness), and step timing.

Package-private: the protocol (what is run, tuned and tested) is the docstring of
:mod:`benchmarks.fhbi`; this module only carries it out.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import ViTForImageClassification

from benchmarks.harness import compare, quiet_training_arguments, time_callable
from hf_extensions.data.hard_digits import fine_class_names, load_hard_digits, render_hard_digits
from hf_extensions.fhbi.particles import ParticleEnsemble
from hf_extensions.metrics.functional import (
    accuracy,
    expected_calibration_error,
    negative_log_likelihood,
)
from hf_extensions.zoo import fixture_path
from trainers.fhbi_config import FHBIConfig
from trainers.fhbi_trainer import FHBITrainer

PRETRAIN_STYLES = ("plain", "noisy", "striped", "paper")
SHIFTED_STYLES = ("cluttered", "blurred")
TEST_SEED = 2026  # the fixed test sets (the zoo's evaluation seed)


@dataclass(frozen=True)
class Arm:
    """One arm: a setting of :class:`FHBIConfig` over the same particles."""

    kernel: str  # "rbf" or "none"
    rho_tuned: bool  # rho from the grid search (else 0)
    likelihood: str = "per_particle"
    likelihood_scale: str = "particle"


@dataclass
class Data:
    """Few-shot training set, validation set and the two fixed test sets (tensors)."""

    train: Any  # datasets.Dataset with pixel_values, labels
    train_x: torch.Tensor
    train_y: torch.Tensor
    validation: tuple[torch.Tensor, torch.Tensor]
    tests: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    columns = split.with_format("torch")[:]
    return columns["pixel_values"].float(), columns["labels"]


def test_sets(settings) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """In-domain (pretraining styles) and shifted (held-out styles) test images of the ``test``
    sources, fine labels, fixed seed: the same for every arm and seed."""
    out = {}
    for name, styles in (("in_domain", PRETRAIN_STYLES), ("shifted", SHIFTED_STYLES)):
        batch = render_hard_digits(
            settings.test_images,
            split="test",
            styles=styles,
            colours=settings.colours,
            seed=TEST_SEED,
        )
        out[name] = (batch.images, batch.fine)
    return out


def make_data(settings, seed: int, tests) -> Data:
    """The few-shot training and the validation images of ``seed`` (pretraining styles)."""
    data = load_hard_digits(
        {"train": settings.train_images, "validation": settings.validation_images},
        styles=PRETRAIN_STYLES,
        colours=settings.colours,
        label="fine",
        seed=seed,
    )
    train = data["train"].select_columns(["pixel_values", "labels"])
    train_x, train_y = _tensors(train)
    return Data(train, train_x, train_y, _tensors(data["validation"]), tests)


def lora_ensemble(settings, seed: int, mode: str = "auto") -> ParticleEnsemble:
    """m particles: LoRA (q/v) + a fresh fine-class head each, over the frozen zoo ViT."""
    names = fine_class_names(settings.colours)
    base = ViTForImageClassification.from_pretrained(
        fixture_path("vit"),
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        ignore_mismatched_sizes=True,
    )
    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_r,
        target_modules=list(settings.lora_targets),
        modules_to_save=["classifier"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the head and LoRA A of particle 0
        base.classifier.reset_parameters()
        model = get_peft_model(base, config)
    return ParticleEnsemble(model, settings.num_particles, seed=seed, mode=mode)


def config(out: str, settings, arm: Arm, *, lr: float, rho: float, seed: int) -> FHBIConfig:
    steps = settings.epochs * (settings.train_images // settings.batch_size)
    return FHBIConfig(
        **quiet_training_arguments(
            out,
            num_train_epochs=settings.epochs,
            per_device_train_batch_size=settings.batch_size,
            optim="adamw_torch",
            learning_rate=lr,
            weight_decay=0.0,
            lr_scheduler_type="cosine",
            warmup_steps=0.05,
            max_grad_norm=0.0,
            seed=seed,
            logging_strategy="steps",
            logging_steps=max(1, steps // settings.log_points),
        ),
        num_particles=settings.num_particles,
        rho=rho if arm.rho_tuned else 0.0,
        kernel=arm.kernel,
        kernel_scope="global",
        ascent_norm="block",
        likelihood=arm.likelihood,
        likelihood_scale=arm.likelihood_scale,
    )


@torch.no_grad()
def predict(ensemble: ParticleEnsemble, images: torch.Tensor, batch: int = 500) -> np.ndarray:
    """Particle-averaged probabilities ``[N, classes]``."""
    ensemble.eval()
    parts = [
        ensemble(pixel_values=images[i : i + batch])["logits"].exp()
        for i in range(0, len(images), batch)
    ]
    return torch.cat(parts).numpy()


def scores(probs: np.ndarray, labels: torch.Tensor) -> dict[str, float]:
    y = labels.numpy()
    return {
        "accuracy": accuracy(probs.argmax(-1), y),
        "nll": negative_log_likelihood(probs, y),
        "ece": expected_calibration_error(probs, y),
    }


@torch.no_grad()
def sharpness(ensemble: ParticleEnsemble, images, labels, sigma: float, draws: int, seed: int):
    """Mean over particles and draws of L_i(θ_i + δ) − L_i(θ_i) on the training images,
    δ ~ N(0, σ² I) on every particle tensor (LoRA A, B, head; each particle its own draw)."""
    ensemble.eval()

    def losses() -> torch.Tensor:
        logits = ensemble.particle_logits(pixel_values=images)
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


def _late_mean(history: list[dict], key: str) -> float:
    """Mean of the logged ``key`` over the last half of the logging points."""
    values = [h[key] for h in history if key in h]
    if not values:
        return float("nan")
    return float(np.mean(values[len(values) // 2 :]))


def train_arm(settings, arm: Arm, data: Data, *, lr: float, rho: float, seed: int):
    """Train one arm on ``data``; the trained ensemble and its training log summary."""
    ensemble = lora_ensemble(settings, seed)
    with tempfile.TemporaryDirectory() as out:
        args = config(out, settings, arm, lr=lr, rho=rho, seed=seed)
        trainer = FHBITrainer(model=ensemble, args=args, train_dataset=data.train)
        trainer.train()
    history = trainer.state.log_history
    log = {
        "train_loss_at_perturbed": _late_mean(history, "loss"),  # L at θ + ε (θ when ρ = 0)
        "train_loss_at_weights": _late_mean(history, "loss_at_weights"),
        "particle_distance": [h["particle_distance"] for h in history if "particle_distance" in h][
            -1
        ],
    }
    log["train_loss_gap"] = log["train_loss_at_perturbed"] - log["train_loss_at_weights"]
    return ensemble, log


def validation_accuracy(settings, arm: Arm, data: Data, *, lr: float, rho: float, seed: int):
    ensemble, _ = train_arm(settings, arm, data, lr=lr, rho=rho, seed=seed)
    images, labels = data.validation
    return scores(predict(ensemble, images), labels)["accuracy"]


def evaluate_arm(settings, arm: Arm, data: Data, *, lr: float, rho: float, seed: int):
    """Train, then every metric of the protocol for one arm and seed."""
    ensemble, log = train_arm(settings, arm, data, lr=lr, rho=rho, seed=seed)
    result: dict[str, float] = {}
    for name, (images, labels) in data.tests.items():
        for metric, value in scores(predict(ensemble, images), labels).items():
            result[f"{metric}_{name}"] = value
    result["sharpness"] = sharpness(
        ensemble,
        data.train_x,
        data.train_y,
        settings.sharpness_sigma,
        settings.sharpness_draws,
        seed=1000 + seed,
    )
    result.update(log)
    return result


# ----------------------------------------------------------------------------- step cost


def _step_fn(ensemble: ParticleEnsemble, out: str, **method):
    """One synchronised FHBI step outside ``train()``: training_step, the kernel rewrite (the
    pre-optimizer-step callback), optimizer and scheduler steps, zero_grad."""
    args = FHBIConfig(
        **quiet_training_arguments(out, optim="adamw_torch", learning_rate=1e-3, max_grad_norm=0.0),
        kernel_scope="global",
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


def run_timing(settings, rho: float) -> dict[str, Any]:
    """Step-time ratios on the benchmark's own model (zoo ViT, LoRA q/v particles), batch 32."""
    m = settings.num_particles
    batch = load_hard_digits(
        {"train": settings.batch_size},
        styles=PRETRAIN_STYLES,
        colours=settings.colours,
        label="fine",
    )["train"]
    images, labels = _tensors(batch)
    inputs = {"pixel_values": images, "labels": labels}
    single = replace(settings, num_particles=1)
    with tempfile.TemporaryDirectory() as out:
        steps = {
            "fhbi_loop": _step_fn(
                lora_ensemble(settings, 0, "loop"), out, num_particles=m, rho=rho
            ),
            "fhbi_no_kernel": _step_fn(
                lora_ensemble(settings, 0), out, num_particles=m, rho=rho, kernel="none"
            ),
            "svgd": _step_fn(lora_ensemble(settings, 0), out, num_particles=m, rho=0.0),
            "single": _step_fn(
                lora_ensemble(single, 0), out, num_particles=1, rho=0.0, kernel="none"
            ),
        }
        baseline = _step_fn(lora_ensemble(settings, 0), out, num_particles=m, rho=rho)
        timed = compare(
            lambda: baseline(inputs),
            {name: (lambda s=s: s(inputs)) for name, s in steps.items()},
            warmup=2,
            repeats=settings.timing_repeats,
        )
        trainer = baseline.trainer
        for p in trainer.model.particles:
            p.grad = torch.randn_like(p)
        kernel_alone = time_callable(
            trainer.apply_kernel, warmup=2, repeats=settings.timing_repeats, number=10
        )
    base = timed["baseline"].median
    candidates = timed["candidates"]
    ratios = {
        "vectorized_vs_loop": base / candidates["fhbi_loop"].median,
        "kernel_overhead": 1.0 + kernel_alone.median / candidates["fhbi_no_kernel"].median,
        "kernel_overhead_end_to_end": base / candidates["fhbi_no_kernel"].median,
        "fhbi_vs_svgd": base / candidates["svgd"].median,
        "svgd_vs_m_single_steps": candidates["svgd"].median / (m * candidates["single"].median),
    }
    metrics = {
        "fhbi_step": timed["baseline"].metrics("ms"),
        "kernel_alone": kernel_alone.metrics("ms"),
    }
    metrics.update({name: r.metrics("ms") for name, r in candidates.items()})
    return {"ratios": ratios, "metrics": metrics}

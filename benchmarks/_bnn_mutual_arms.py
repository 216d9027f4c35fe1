"""Package-private machinery of :mod:`benchmarks.bnn_mutual`: data, peers, one training run,
scoring (raw and after one temperature fitted on validation) and the peers' disagreement.

Pham et al., "Model and Feature Diversity for Bayesian Neural Networks in Mutual Learning",
NeurIPS 2023 (arXiv 2407.02721). The protocol (what is run, tuned and tested) lives in the
docstring of :mod:`benchmarks.bnn_mutual`; this module only executes it.
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from transformers import ViTForImageClassification

from benchmarks.harness import quiet_training_arguments
from hf_extensions.bnn import PeerEnsemble, convert_to_bayesian, flat_posterior, peer_distance
from hf_extensions.data.hard_digits import load_hard_digits
from hf_extensions.metrics import accuracy, expected_calibration_error, negative_log_likelihood
from hf_extensions.zoo import fixture_path
from trainers.bnn_mutual_config import BayesianMutualLearningConfig
from trainers.bnn_mutual_trainer import BayesianMutualLearningTrainer

INKS = ("red", "green", "blue", "yellow")
IN_DOMAIN_STYLES = ("plain", "noisy", "striped", "paper")  # the fixture's pretraining styles
SHIFTED_STYLES = ("cluttered", "blurred")  # held out from the fixture
FEATURE_LAYERS = ["vit.layers.1", "vit.layers.3", "classifier:input"]
TEMPERATURE_BOUNDS = (0.05, 20.0)


@dataclass(frozen=True)
class Settings:
    """Everything shared by every arm (fixed in the protocol)."""

    train_images: int = 512
    validation_images: int = 400
    test_images: int = 800
    shifted_images: int = 400  # per shifted style
    epochs: int = 6
    batch_size: int = 32
    learning_rate: float = 3e-3
    moped_delta: float = 0.1
    prior_std: float = 1.0
    prior_mean: str = "zero"
    kl_weight: float = 1.0
    mc_samples: int = 8
    num_peers: int = 2


def load_data(settings: Settings, seed: int, splits: tuple[str, ...]) -> dict[str, Any]:
    """The run's splits (rendered with ``seed``): train/validation/test in-domain, and the
    ``cluttered`` / ``blurred`` test images. ``splits`` picks which evaluation sets to render."""
    sizes = {"train": settings.train_images, "validation": settings.validation_images}
    if "test" in splits:
        sizes["test"] = settings.test_images
    common = dict(colours=INKS, label="fine", seed=seed)
    data = dict(load_hard_digits(sizes, styles=IN_DOMAIN_STYLES, **common))
    for style in SHIFTED_STYLES:
        if style in splits:
            shifted = load_hard_digits({"test": settings.shifted_images}, styles=(style,), **common)
            data[style] = shifted["test"]
    return data


def build_peers(settings: Settings, seed: int) -> PeerEnsemble:
    """``num_peers`` copies of ONE network: the zoo ViT with a new 40-way head (seeded), made
    Bayesian with MOPED (means = the weights, sigma = delta |w|); features start aligned."""
    model = ViTForImageClassification.from_pretrained(fixture_path("vit"), dtype=torch.float32)
    generator = torch.Generator().manual_seed(1000 + seed)
    head = torch.nn.Linear(model.config.hidden_size, len(INKS) * 10)
    with torch.no_grad():
        head.weight.copy_(0.02 * torch.randn(head.weight.shape, generator=generator))
        head.bias.zero_()
    model.classifier = head
    model.config.num_labels = head.out_features
    convert_to_bayesian(
        model,
        prior_std=settings.prior_std,
        moped_delta=settings.moped_delta,
        prior_mean=settings.prior_mean,
    )
    peers = [copy.deepcopy(model).train() for _ in range(settings.num_peers)]
    return PeerEnsemble(peers, mc_samples=settings.mc_samples)


def train(
    settings: Settings, weights: dict[str, float], seed: int, data: dict[str, Any]
) -> tuple[PeerEnsemble, dict[str, float]]:
    """Train one arm (its ``weights``: mutual, parameter and feature diversity) on ``seed``."""
    ensemble = build_peers(settings, seed)
    with torch.no_grad():
        start = torch.cat([flat_posterior(p).mu.abs() for p in ensemble.peers]).mean()
    start_abs_mu = float(start)
    train_split = data["train"].select_columns(["pixel_values", "labels"])
    with tempfile.TemporaryDirectory() as output_dir:
        args = BayesianMutualLearningConfig(
            **quiet_training_arguments(
                output_dir,
                seed=seed,
                optim="adamw_torch",
                learning_rate=settings.learning_rate,
                weight_decay=0.0,
                num_train_epochs=settings.epochs,
                per_device_train_batch_size=settings.batch_size,
                lr_scheduler_type="cosine",
                max_grad_norm=0.0,
                kl_weight=settings.kl_weight,
                mc_samples=settings.mc_samples,
                feature_layers=FEATURE_LAYERS,
                **weights,
            )
        )
        trainer = BayesianMutualLearningTrainer(
            model=ensemble, args=args, train_dataset=train_split
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    with torch.no_grad():
        end_abs_mu = float(torch.cat([flat_posterior(p).mu.abs() for p in ensemble.peers]).mean())
    return ensemble, {
        "train_seconds": seconds,
        "mean_abs_mu": end_abs_mu,
        "mean_abs_mu_change": end_abs_mu - start_abs_mu,
    }


@torch.no_grad()
def peer_log_probs(ensemble: PeerEnsemble, split, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``[K, N, C]`` log predictive of each peer (``mc_samples`` draws each) and the labels."""
    ensemble.eval()
    columns = split.with_format("torch")[:]
    torch.manual_seed(10_000 + seed)  # the evaluation's posterior draws
    parts = [
        ensemble.peer_log_probs(pixel_values=columns["pixel_values"][rows].float())
        for rows in torch.arange(len(split)).split(400)
    ]
    return torch.cat(parts, dim=1), columns["labels"].numpy()


def average(log_probs: torch.Tensor) -> np.ndarray:
    """Log of the peers' averaged predictive (the Bayesian model average), float64."""
    mixed = log_probs.double().logsumexp(0) - math.log(log_probs.shape[0])
    return mixed.numpy()


def tempered(log_p: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log_p / T)`` as probabilities (rows renormalised)."""
    z = log_p / temperature
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def fit_temperature(log_p: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` minimising the NLL of ``softmax(log_p / T)`` (bounded search over ``log T``)."""
    low, high = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(tempered(log_p, math.exp(log_t)), labels),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(math.exp(result.x))


def _scores(log_p: np.ndarray, labels: np.ndarray, temperature: float, suffix: str) -> dict:
    raw, scaled = tempered(log_p, 1.0), tempered(log_p, temperature)
    return {
        f"accuracy{suffix}": accuracy(raw.argmax(1), labels),
        f"nll{suffix}": negative_log_likelihood(raw, labels),
        f"ece{suffix}": expected_calibration_error(raw, labels, n_bins=15),
        f"confidence{suffix}": float(raw.max(1).mean()),
        f"nll_ts{suffix}": negative_log_likelihood(scaled, labels),
        f"ece_ts{suffix}": expected_calibration_error(scaled, labels, n_bins=15),
    }


def _disagreement(log_probs: torch.Tensor) -> float:
    votes = log_probs.argmax(-1)
    count = votes.shape[0]
    pairs = [(a, b) for a in range(count) for b in range(a + 1, count)]
    return float(np.mean([(votes[a] != votes[b]).float().mean().item() for a, b in pairs]))


def score(ensemble: PeerEnsemble, data: dict[str, Any], seed: int, full: bool) -> dict[str, float]:
    """Validation NLL after its own temperature (the tuning score); with ``full``, every metric
    of the protocol on the in-domain test and the shifted styles (temperature from validation)."""
    val_log_probs, val_labels = peer_log_probs(ensemble, data["validation"], seed)
    val_log_p = average(val_log_probs)
    temperature = fit_temperature(val_log_p, val_labels)
    metrics = {
        "temperature": temperature,
        "validation_nll_ts": negative_log_likelihood(tempered(val_log_p, temperature), val_labels),
    }
    if not full:
        return metrics
    test_log_probs, test_labels = peer_log_probs(ensemble, data["test"], seed)
    metrics.update(_scores(average(test_log_probs), test_labels, temperature, ""))
    metrics["disagreement"] = _disagreement(test_log_probs)
    metrics["peer_accuracy"] = float(
        np.mean([accuracy(lp.argmax(-1).numpy(), test_labels) for lp in test_log_probs])
    )
    shifted_log_p, shifted_labels = [], []
    for style in SHIFTED_STYLES:
        log_probs, labels = peer_log_probs(ensemble, data[style], seed)
        metrics[f"disagreement_{style}"] = _disagreement(log_probs)
        metrics[f"accuracy_{style}"] = accuracy(average(log_probs).argmax(1), labels)
        shifted_log_p.append(average(log_probs))
        shifted_labels.append(labels)
    metrics.update(
        _scores(
            np.concatenate(shifted_log_p), np.concatenate(shifted_labels), temperature, "_shifted"
        )
    )
    metrics["disagreement_shifted"] = float(
        np.mean([metrics[f"disagreement_{s}"] for s in SHIFTED_STYLES])
    )
    pairs = [(a, b) for a in range(len(ensemble.peers)) for b in range(a + 1, len(ensemble.peers))]
    metrics["peer_distance"] = float(
        np.mean([peer_distance(ensemble.peers[a], ensemble.peers[b]) for a, b in pairs])
    )
    return metrics


def run(settings: Settings, weights: dict[str, float], seed: int, full: bool) -> dict[str, float]:
    """Train one arm on ``seed`` and score it (validation only unless ``full``)."""
    splits = ("test", *SHIFTED_STYLES) if full else ()
    data = load_data(settings, seed, splits)
    ensemble, extra = train(settings, weights, seed, data)
    return {**score(ensemble, data, seed, full), **extra}

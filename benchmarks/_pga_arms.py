"""Package-private pieces of ``benchmarks.pga``: the data, one trained arm, and the statistics.

The benchmark's protocol is the docstring of :mod:`benchmarks.pga`; this module only holds what
it runs: hard-digit domains rendered once and encoded once by the frozen zoo CLIP
(:func:`encoded_domains`), a prompt learner over those cached features (:class:`FeatureLearner`),
one PGA-family run through :class:`trainers.PGATrainer` (:func:`run_arm`), and a resampling
interval over the test images (:func:`image_bootstrap`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from benchmarks.harness import quiet_training_arguments
from hf_extensions.data.hard_digits import DIGIT_WORDS, render_hard_digits
from hf_extensions.pga.clip_prompts import CLIPPromptLearner
from trainers.pga_config import PGAConfig
from trainers.pga_trainer import PairedDomainDataset, PGATrainer

#: The four sets of the benchmark: ``name -> (source split, style, render seed)``. Each set is its
#: own random stream (different seeds, or different source splits), so no two share a render.
SETS = {
    "source_train": ("train", "noisy", 101),
    "target_train": ("train", "cluttered", 102),
    "target_validation": ("validation", "cluttered", 103),
    "target_test": ("test", "cluttered", 104),
}


class FeatureLearner(CLIPPromptLearner):
    """:class:`CLIPPromptLearner` whose inputs are the frozen image tower's features.

    The image tower is frozen and the images are not augmented, so encoding every image once
    before training gives exactly the features every pass would compute (the trainer's
    ``cache_image_features`` does the same within one step). ``pixel_values`` of shape
    ``[N, D]`` are such features; image batches ``[N, 3, H, W]`` still go through the tower.
    """

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() == 2:
            return F.normalize(pixel_values.float(), dim=-1)
        return super().image_features(pixel_values)


def encoded_domains(
    learner: CLIPPromptLearner, sizes: Mapping[str, int], normalise
) -> dict[str, dict[str, torch.Tensor]]:
    """Render every set of :data:`SETS` (``sizes[name]`` images) and encode it once:
    ``{name: {"features": [N, D] normalised, "labels": [N]}}``."""
    out = {}
    for name, (split, style, seed) in SETS.items():
        batch = render_hard_digits(sizes[name], split=split, styles=(style,), seed=seed)
        pixels = normalise(batch.images)
        features = torch.cat(
            [learner.image_features(pixels[i : i + 500]) for i in range(0, len(pixels), 500)]
        )
        out[name] = {"features": features, "labels": batch.digits}
    return out


@torch.no_grad()
def accuracy_and_correct(learner: CLIPPromptLearner, data: Mapping[str, torch.Tensor]):
    """Accuracy of the averaged source/target prediction (the paper's test rule), and the
    per-image correctness vector."""
    correct = learner.predict_proba(data["features"]).argmax(-1) == data["labels"]
    return float(correct.float().mean()), correct


class ValidationCurve(TrainerCallback):
    """Target-validation accuracy every ``every`` steps (the plateau evidence; not a selection:
    every arm is scored at its last step)."""

    def __init__(self, learner: CLIPPromptLearner, validation, every: int):
        self.learner, self.validation, self.every = learner, validation, every
        self.curve: list[tuple[int, float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.learner.eval()
            self.curve.append(
                (state.global_step, accuracy_and_correct(self.learner, self.validation)[0])
            )
            self.learner.train()


def _mean_of(logs: Sequence[Mapping[str, Any]], key: str) -> float:
    values = [entry[key] for entry in logs if key in entry]
    return float(np.mean(values)) if values else 0.0


def _max_of(logs: Sequence[Mapping[str, Any]], key: str) -> float:
    values = [entry[key] for entry in logs if key in entry]
    return float(np.max(values)) if values else 0.0


def run_arm(
    clip,
    tokenizer,
    data: Mapping[str, Mapping[str, torch.Tensor]],
    pseudo: torch.Tensor,
    settings: Mapping[str, float],
    seed: int,
    opts,
    *,
    test: bool,
) -> dict[str, Any]:
    """Train one arm (``settings``: ``lr``, ``rho``, ``align``) for ``opts.steps`` steps with
    ``seed`` (prompt initialisation and batch order) and score its last step.

    The target rows carry ``pseudo`` (zero-shot labels, ``-100`` unconfident); their true
    labels are never read here. Returns the last step's validation accuracy, the validation
    curve, training-log means (gradient cosine, shift sizes relative to ``‖θ_sh‖``) and, when
    ``test``, the target test accuracy and per-image correctness."""
    torch.manual_seed(seed)
    learner = FeatureLearner(
        clip, tokenizer, DIGIT_WORDS, ["source", "target"],
        n_ctx_shared=opts.n_ctx, n_ctx_domain=opts.n_ctx,
    )  # fmt: skip
    train = PairedDomainDataset(
        {
            "source": {
                "pixel_values": data["source_train"]["features"],
                "labels": data["source_train"]["labels"],
            },
            "target": {"pixel_values": data["target_train"]["features"], "labels": pseudo},
        },
        seed=seed,
    )
    curve = ValidationCurve(learner, data["target_validation"], opts.eval_every)
    with tempfile.TemporaryDirectory() as output_dir:
        config = PGAConfig(
            **quiet_training_arguments(
                output_dir, seed=seed, logging_strategy="steps", logging_steps=10,
                log_level="error",
            ),
            pga_rho=settings["rho"],
            pga_align=settings["align"],
            pga_tradeoff=opts.tradeoff,
            pseudo_label_threshold=opts.threshold,
            n_ctx_shared=opts.n_ctx,
            n_ctx_domain=opts.n_ctx,
            max_steps=opts.steps,
            per_device_train_batch_size=opts.batch_size,
            learning_rate=settings["lr"],
            weight_decay=0.0,
            lr_scheduler_type="cosine",
            max_grad_norm=0.0,
        )  # fmt: skip
        trainer = PGATrainer(model=learner, args=config, train_dataset=train, callbacks=[curve])
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        logs = trainer.state.log_history
    learner.eval()
    result: dict[str, Any] = {
        "validation_accuracy": curve.curve[-1][1],
        "validation_curve": curve.curve,
        "grad_cosine": _mean_of(logs, "grad_cosine"),
        "rho_shift_rel": _mean_of(logs, "rho_shift_rel"),
        "align_shift_rel": _mean_of(logs, "align_shift_rel"),
        "align_shift_rel_max": _max_of(logs, "align_shift_rel"),
        "shared_norm": float(learner.shared_ctx.detach().norm()),
        "train_seconds": seconds,
    }
    if test:
        result["target_accuracy"], result["correct"] = accuracy_and_correct(
            learner, data["target_test"]
        )
    return result


def image_bootstrap(
    method: torch.Tensor, baseline: torch.Tensor, *, draws: int = 2000, seed: int = 0
) -> dict[str, float]:
    """95% percentile interval of the seed-averaged accuracy difference when the *test images*
    are resampled (``method`` / ``baseline``: ``[seeds, images]`` correctness, paired by seed and
    image): the test-set sampling error that the per-seed interval does not contain."""
    difference = (method.float() - baseline.float()).mean(0).numpy()
    generator = np.random.default_rng(seed)
    index = generator.integers(0, difference.size, size=(draws, difference.size))
    means = difference[index].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(difference.mean()), "low": float(low), "high": float(high)}

"""Agnostic-SAM recipe: train an image classifier with :class:`trainers.AgnosticSAMTrainer`.

Embedded default (offline, CPU, about a minute): a tiny ViT on scikit-learn's digits with 40%
symmetric label noise on the training split; validation and test labels are clean::

    accelerate launch recipes/agnostic_sam/train.py --config recipes/agnostic_sam/digits_noisy.yaml

Two CPU processes (data parallel over gloo)::

    accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml \
        recipes/agnostic_sam/train.py --config recipes/agnostic_sam/digits_noisy.yaml

Paper scale (needs Hub access and GPUs): ViT-B/16 fine-tuned on CIFAR-100::

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \
        recipes/agnostic_sam/train.py --config recipes/agnostic_sam/cifar100_vit.yaml

Every field of ``AgnosticSAMConfig`` (``rho_train``, ``rho_val``, ``val_fraction``, ``chain``,
``final_grad_on``, ``adaptive``, ...) and of ``TrainingArguments`` can be set in the YAML or
overridden on the command line; ``--help`` lists them.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from hf_extensions.cli import RecipeArgumentParser, resume_checkpoint
from hf_extensions.metrics import compute_classification_metrics
from hf_extensions.models.image_classification import (
    ImageClassificationArguments,
    build_datasets,
    build_model,
    class_names,
)
from trainers import AgnosticSAMConfig, AgnosticSAMTrainer

RECIPE_DIR = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> tuple[AgnosticSAMTrainer, dict[str, float]]:
    """Train, evaluate on the (clean) test split, save with a model card, push if asked."""
    parser = RecipeArgumentParser((ImageClassificationArguments, AgnosticSAMConfig))
    script_args, config = parser.parse(argv)
    if script_args.dataset_name is not None:
        config.remove_unused_columns = False  # the transform needs the image column
    data = build_datasets(script_args, seed=config.seed)
    trainer = AgnosticSAMTrainer(
        model=build_model(script_args, class_names(data)),
        args=config,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        compute_metrics=compute_classification_metrics,
    )
    trainer.train(resume_from_checkpoint=resume_checkpoint(config))
    metrics = trainer.finish(
        data["test"], dataset=script_args.dataset_name or "scikit-learn digits"
    )
    return trainer, metrics


def demo() -> dict[str, float]:
    """The embedded default: tiny ViT, digits with 40% label noise; clean test metrics."""
    with tempfile.TemporaryDirectory() as output_dir:
        _, metrics = main(
            ["--config", str(RECIPE_DIR / "digits_noisy.yaml"), "--output_dir", output_dir]
        )
    return {
        "test accuracy": metrics["test_accuracy"],
        "test NLL": metrics["test_nll"],
        "test ECE": metrics["test_ece"],
    }


if __name__ == "__main__":
    main(sys.argv[1:])

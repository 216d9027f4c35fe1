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

from pathlib import Path

from hf_extensions.cli import (
    CLASSIFICATION_SUMMARY,
    RecipeArgumentParser,
    run_as_script,
    trainer_artifact,
)
from hf_extensions.demo import Comparison, run_comparison
from hf_extensions.models.image_classification import (
    ImageClassificationArguments,
    train_image_classifier,
)
from trainers import AgnosticSAMConfig, AgnosticSAMTrainer

RECIPE_DIR = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> tuple[AgnosticSAMTrainer, dict[str, float]]:
    """Train, evaluate on the (clean) test split, save with a model card, push if asked."""
    parser = RecipeArgumentParser((ImageClassificationArguments, AgnosticSAMConfig))
    script_args, config = parser.parse(argv)
    return train_image_classifier(AgnosticSAMTrainer, script_args, config)


def demo() -> Comparison:
    """The zoo's ViT fine-tuned on held-out styles with 40% label noise, beside the same run
    with both radii 0 (the stock AdamW step, as the conformance suite checks); clean test
    metrics."""
    return run_comparison(
        method=main,
        baseline_name="rho_train = rho_val = 0 (the stock step)",
        baseline_flags=["--rho_train", "0", "--rho_val", "0"],
        config=RECIPE_DIR / "zoo_vit.yaml",
        summary=CLASSIFICATION_SUMMARY,
        lower_is_better=("test NLL", "test ECE"),
        fixture="vit",
    )


def artifact(result):
    """The saved model and the line that loads it (printed at the end of a run)."""
    return trainer_artifact(result[0])


if __name__ == "__main__":
    run_as_script(main, CLASSIFICATION_SUMMARY, artifacts=artifact)

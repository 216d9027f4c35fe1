"""Example recipe: fine-tune an image classifier on scikit-learn's digits with the stock Trainer.

It shows the recipe convention every method of hf-extensions follows:

- one ``train.py`` whose arguments are dataclasses (here ``ImageClassificationArguments``, shared
  by the image-classification recipes in ``hf_extensions/models/image_classification.py``, and the Trainer's own
  ``TrainingArguments``; a method recipe uses its ``XConfig``), parsed from a YAML file plus
  command-line overrides by ``RecipeArgumentParser`` (``--help`` lists every field);
- one YAML per setting: ``digits.yaml`` is the embedded default (a tiny ViT built from a config,
  no download), ``vit_base.yaml`` the same script on a Hub checkpoint for a real GPU run;
- launched with Accelerate, e.g.::

      accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \
          recipes/example/train.py --config recipes/example/digits.yaml

- the skeleton of :mod:`hf_extensions.cli`: parse → build → train → finish (test metrics, save,
  model card, push, from the main process) → summary (metrics, where the model is, the line
  that loads it);
- what is saved loads with the ecosystem's own loader: the model with its image processor and
  label names, so ``pipeline("image-classification", model=output_dir)`` classifies an image;
- a ``demo()`` that runs the embedded default quickly and returns its metrics, registered in
  ``recipes/demo.py``.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Trainer, TrainingArguments

from hf_extensions.cli import (
    CLASSIFICATION_SUMMARY,
    RecipeArgumentParser,
    artifact_id,
    run_as_script,
    run_demo,
    trainer_artifact,
)
from hf_extensions.hub import build_model_card, image_classifier_usage
from hf_extensions.models.image_classification import (
    ImageClassificationArguments,
    train_image_classifier,
)

RECIPE_DIR = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> tuple[Trainer, dict[str, float]]:
    """Train, evaluate on the test split, save (and push, with ``--push_to_hub``) the model."""
    parser = RecipeArgumentParser((ImageClassificationArguments, TrainingArguments))
    script_args, training_args = parser.parse(argv)
    dataset = script_args.dataset_name or "scikit-learn digits"

    def card(metrics):
        return build_model_card(
            method="fine-tuning",
            paper=None,
            hyperparameters={
                "learning_rate": training_args.learning_rate,
                "num_train_epochs": training_args.num_train_epochs,
                "per_device_train_batch_size": training_args.per_device_train_batch_size,
                "label_noise": script_args.label_noise,
                "seed": training_args.seed,
            },
            metrics={k: float(v) for k, v in metrics.items() if k.startswith("test_")},
            base_model=script_args.model_name_or_path,
            datasets=[dataset],
            usage=image_classifier_usage(artifact_id(training_args)),
        )

    return train_image_classifier(Trainer, script_args, training_args, card=card)


def demo() -> dict[str, float]:
    """The embedded default, quick: tiny ViT on digits, test accuracy / NLL / ECE."""
    return run_demo(main, RECIPE_DIR / "digits.yaml", CLASSIFICATION_SUMMARY)


def artifact(result):
    """The saved classifier and the line that loads it (printed at the end of a run)."""
    return trainer_artifact(result[0], image_classifier_usage)


if __name__ == "__main__":
    run_as_script(main, CLASSIFICATION_SUMMARY, artifacts=artifact)

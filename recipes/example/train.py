"""Example recipe: fine-tune an image classifier on scikit-learn's digits with the stock Trainer.

It shows the recipe convention every method of hf-extensions follows:

- one ``train.py`` whose arguments are dataclasses (here ``ScriptArguments`` and the Trainer's own
  ``TrainingArguments``; a method recipe uses its ``XConfig``), parsed from a YAML file plus
  command-line overrides by ``RecipeArgumentParser`` (``--help`` lists every field);
- one YAML per setting: ``digits.yaml`` is the embedded default (a tiny ViT built from a config,
  no download), ``vit_base.yaml`` the same script on a Hub checkpoint for a real GPU run;
- launched with Accelerate, e.g.::

      accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \
          recipes/example/train.py --config recipes/example/digits.yaml

- a ``demo()`` that runs the embedded default quickly and returns its metrics, registered in
  ``recipes/demo.py``.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    Trainer,
    TrainingArguments,
)

from hf_extensions.cli import RecipeArgumentParser
from hf_extensions.data import CLASS_NAMES, add_label_noise, load_digits
from hf_extensions.hub import build_model_card, save_model_card
from hf_extensions.metrics import compute_classification_metrics
from hf_extensions.testing import tiny_vit_classifier

RECIPE_DIR = Path(__file__).resolve().parent


@dataclass
class ScriptArguments:
    """What to train on and which model to start from."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local path of an image classifier to fine-tune (e.g. "
            "google/vit-base-patch16-224-in21k). Empty: a tiny ViT built from a config (offline)."
        },
    )
    image_size: int = field(default=8, metadata={"help": "Side the 8x8 digits are resized to."})
    num_channels: int = field(
        default=1, metadata={"help": "Channels the gray digits are repeated into."}
    )
    patch_size: int = field(
        default=2, metadata={"help": "Patch size of the tiny ViT (no checkpoint)."}
    )
    hidden_size: int = field(
        default=32, metadata={"help": "Width of the tiny ViT (no checkpoint)."}
    )
    num_layers: int = field(default=2, metadata={"help": "Depth of the tiny ViT (no checkpoint)."})
    split_seed: int = field(
        default=0, metadata={"help": "Seed of the train/validation/test split."}
    )
    label_noise: float = field(
        default=0.0, metadata={"help": "Rate of symmetric label noise on the training split."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples (quick runs)."}
    )

    def __post_init__(self):
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"`label_noise` must be in [0, 1), got {self.label_noise}.")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"`max_train_samples` must be >= 1, got {self.max_train_samples}.")


def build_model(args: ScriptArguments):
    """The model to fine-tune: a Hub checkpoint with a new 10-way head, or a tiny ViT."""
    if args.model_name_or_path is None:
        return tiny_vit_classifier(
            image_size=args.image_size,
            patch_size=args.patch_size,
            num_channels=args.num_channels,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
        )
    return AutoModelForImageClassification.from_pretrained(
        args.model_name_or_path,
        num_labels=len(CLASS_NAMES),
        id2label=dict(enumerate(CLASS_NAMES)),
        label2id={name: i for i, name in enumerate(CLASS_NAMES)},
        ignore_mismatched_sizes=True,
    )


def build_datasets(args: ScriptArguments, seed: int):
    """Digits split by ``split_seed``, noisy training labels if asked, normalised for checkpoints."""
    data = load_digits(args.split_seed, image_size=args.image_size, num_channels=args.num_channels)
    train = data["train"]
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.label_noise > 0:
        train = add_label_noise(train, args.label_noise, seed=seed)
    data["train"] = train
    if args.model_name_or_path is not None:
        processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
        mean = np.asarray(processor.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(processor.image_std, dtype=np.float32)[:, None, None]

        def normalize(batch):
            pixels = np.asarray(batch["pixel_values"], dtype=np.float32)
            return {**batch, "pixel_values": (pixels - mean) / std}

        data = data.with_transform(normalize)
    return data


def main(argv: list[str] | None = None) -> tuple[Trainer, dict[str, float]]:
    """Train, evaluate on the test split, save (and push, with ``--push_to_hub``) the model."""
    parser = RecipeArgumentParser((ScriptArguments, TrainingArguments))
    script_args, training_args = parser.parse(argv)
    data = build_datasets(script_args, seed=training_args.seed)
    trainer = Trainer(
        model=build_model(script_args),
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        compute_metrics=compute_classification_metrics,
    )
    trainer.train()
    metrics = trainer.evaluate(data["test"], metric_key_prefix="test")
    trainer.save_model()
    if trainer.is_world_process_zero():
        card = build_model_card(
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
            datasets=["scikit-learn digits"],
        )
        save_model_card(card, training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return trainer, metrics


def demo() -> dict[str, float]:
    """The embedded default, quick: tiny ViT on digits, test accuracy / NLL / ECE."""
    with tempfile.TemporaryDirectory() as output_dir:
        _, metrics = main(["--config", str(RECIPE_DIR / "digits.yaml"), "--output_dir", output_dir])
    return {
        "test accuracy": metrics["test_accuracy"],
        "test NLL": metrics["test_nll"],
        "test ECE": metrics["test_ece"],
    }


if __name__ == "__main__":
    main(sys.argv[1:])

"""The Agnostic-SAM recipe: model card and the image-dataset path (2 processes = 1: the
conformance suite)."""

from pathlib import Path

import numpy as np
from PIL import Image

from hf_extensions.hub import check_model_card_method
from hf_extensions.models import tiny_vit_classifier
from recipes.agnostic_sam.train import main

ROOT = Path(__file__).resolve().parents[1]
NOISY_YAML = ROOT / "recipes" / "agnostic_sam" / "digits_noisy.yaml"


def test_recipe_trains_on_noisy_digits_and_writes_its_card(tmp_path):
    trainer, metrics = main(
        ["--config", str(NOISY_YAML), "--output_dir", str(tmp_path), "--num_train_epochs", "4",
         "--eval_strategy", "no", "--logging_steps", "10"]
    )  # fmt: skip
    assert metrics["test_accuracy"] > 0.2  # clean test labels; chance is 0.1
    noisy = trainer.train_dataset
    assert np.mean(np.asarray(noisy["labels"]) != np.asarray(noisy["clean_labels"])) > 0.35
    metadata = check_model_card_method(tmp_path / "README.md", "agnostic-sam")
    assert metadata["hyperparameters"]["rho_train"] == 0.05
    assert metadata["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    logged = [h for h in trainer.state.log_history if "val_split_loss" in h]
    assert logged and all(h["perturbation_norm"] > 0 for h in logged)


def _image_folder(root: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for split, rows in (("train", range(0, 60)), ("test", range(60, 90))):
        for row in rows:
            label = int(digits.target[row])
            if label > 2:
                continue
            folder = root / split / f"digit_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[row] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{row}.png")


def test_recipe_reads_an_image_dataset_through_the_checkpoint_processor(tmp_path):
    """The real-run path (load_dataset + a checkpoint's processor), offline on an imagefolder."""
    from transformers import ViTImageProcessor

    _image_folder(tmp_path / "images")
    checkpoint = tmp_path / "checkpoint"
    tiny_vit_classifier(num_labels=7, num_channels=3).save_pretrained(checkpoint)
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(checkpoint)
    trainer, metrics = main(
        ["--config", str(NOISY_YAML), "--model_name_or_path", str(checkpoint),
         "--dataset_name", "imagefolder", "--data_dir", str(tmp_path / "images"),
         "--label_noise", "0", "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
         "--eval_strategy", "no"]
    )  # fmt: skip
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.config.num_labels == 3
    assert sorted(model.config.id2label.values()) == ["digit_0", "digit_1", "digit_2"]
    assert trainer.state.global_step == 2 and 0.0 <= metrics["test_accuracy"] <= 1.0


def test_paper_scale_setting_parses_into_valid_configs(tmp_path):
    """The CIFAR-100 ViT-B/16 YAML (not run here: Hub and GPUs) is valid for the recipe's parser."""
    from hf_extensions.cli import RecipeArgumentParser
    from hf_extensions.models.image_classification import ImageClassificationArguments
    from trainers import AgnosticSAMConfig

    parser = RecipeArgumentParser((ImageClassificationArguments, AgnosticSAMConfig))
    script_args, config = parser.parse(
        ["--config", str(ROOT / "recipes/agnostic_sam/cifar100_vit.yaml"),
         "--output_dir", str(tmp_path), "--use_cpu", "true"]  # bf16 needs a GPU or use_cpu
    )  # fmt: skip
    assert script_args.dataset_name == "uoft-cs/cifar100"
    assert config.rho_train == 0.05 and config.warmup_steps == 0.05

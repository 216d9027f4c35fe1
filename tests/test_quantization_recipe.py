"""The quantization recipe: YAML + CLI, trains the embedded CNN, quantizes, saves, reloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_extensions.quantization import load_quantized
from hf_extensions.quantization.models import DigitsResNet
from recipes.quantization.train import QuantizationRecipeArguments, main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "quantization"


def test_recipe_quantizes_saves_and_reloads(tmp_path):
    models, metrics = main(
        [
            "--config",
            str(RECIPE / "digits.yaml"),
            "--output_dir",
            str(tmp_path),
            "--settings",
            "w4a4",
            "--train_epochs",
            "2",
            "--iterations",
            "5",
            "--meta_iterations",
            "2",
        ]
    )
    out = tmp_path / "w4a4"
    for name in ("model.safetensors", "quantization_config.json", "model_int.safetensors"):
        assert (out / name).exists(), name
    assert "MetaAug" in (out / "README.md").read_text()
    assert {"fp_heldout_acc", "w4a4_metaaug_heldout_acc", "w4a4_metaaug_calib_acc"} <= set(metrics)
    loaded = load_quantized(DigitsResNet(width=16), out)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), models["w4a4"].eval()(x))
    assert loaded.layer1.conv1.weight_bits == 4 and loaded.conv1.activation_bits is None


def test_recipe_settings_are_validated():
    # (``python -I train.py --help`` is covered for every recipe by tests/test_recipes.py.)
    assert QuantizationRecipeArguments(settings=["w8a16"]).settings == ["w8a16"]
    with pytest.raises(ValueError, match="settings"):
        QuantizationRecipeArguments(settings=["w4"])
    with pytest.raises(ValueError, match="dataset_name"):
        QuantizationRecipeArguments(dataset_name="ILSVRC/imagenet-1k")
    with pytest.raises(ValueError, match="hub_model_id"):
        QuantizationRecipeArguments(push_to_hub=True)

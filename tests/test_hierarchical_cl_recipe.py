"""The hierarchical continual-learning recipe (embedded digits default) and its paper settings."""

from __future__ import annotations

import json

import pytest

from hf_extensions.cli import RecipeArgumentParser
from hf_extensions.hub import read_model_card_metadata
from recipes.hierarchical_cl.train import (
    RECIPE_DIR,
    HierarchicalCLScriptArguments,
    main,
)
from trainers import HierarchicalPromptCLConfig

FAST = [
    "--num_train_epochs", "1", "--upstream_epochs", "15", "--ca_epochs", "2", "--tii_epochs", "5",
    "--num_components", "3", "--ot_samples", "40", "--num_tasks", "3",
]  # fmt: skip


def test_recipe_learns_the_stream_saves_adapter_state_and_card(tmp_path):
    trainer, metrics = main(
        ["--config", str(RECIPE_DIR / "digits.yaml"), "--output_dir", str(tmp_path), *FAST]
    )
    assert len(trainer.task_classes) == 3
    # 3 tasks of 3 classes each (10 // 3), far above chance (1/9) after the stream
    assert metrics["test_final_average_accuracy"] > 0.5
    for name in ("adapter_config.json", "continual_state.safetensors", "continual_state.json"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "accuracy_matrix.json").read_text())
    assert saved["faa"] == pytest.approx(metrics["test_final_average_accuracy"])
    card = read_model_card_metadata(tmp_path)
    assert card["hyperparameters"]["tasks_learned"] == 3
    assert card["hyperparameters"]["reg_sub"] == 0.1


@pytest.mark.parametrize("setting", ["digits", "cifar100", "imagenet_r"])
def test_settings_parse_and_validate(setting):
    parser = RecipeArgumentParser((HierarchicalCLScriptArguments, HierarchicalPromptCLConfig))
    script, config = parser.parse(["--config", str(RECIPE_DIR / f"{setting}.yaml")])
    assert config.hierarchical and config.use_ot
    if setting != "digits":
        assert script.model_name_or_path == "google/vit-base-patch16-224-in21k"
        assert script.num_tasks == 10

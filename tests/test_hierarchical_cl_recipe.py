"""The hierarchical continual-learning recipe (embedded digits default) and its paper settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_extensions.cli import RecipeArgumentParser
from hf_extensions.hub import read_model_card_metadata
from hf_extensions.testing.distributed import launch
from recipes.hierarchical_cl.train import (
    RECIPE_DIR,
    HierarchicalCLScriptArguments,
    main,
)
from trainers import HierarchicalPromptCLConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "hierarchical_cl_ranks.py"
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


def _flags(tmp_path, name, batch, *extra):
    return ["--config", str(RECIPE_DIR / "digits.yaml"), "--output_dir", str(tmp_path / name),
            *FAST, "--num_tasks", "2", "--max_steps", "3", "--upstream_epochs", "2", "--vit_layers", "2", "--optim", "sgd", "--learning_rate", "0.1",
            "--per_device_train_batch_size", str(batch), *extra]  # fmt: skip


@pytest.mark.slow  # three launches: about 2 minutes on 2 busy cores
def test_two_processes_agree_and_equal_one_process_at_the_same_global_batch(tmp_path):
    """Every rank ends with the same prompts, heads and class statistics; with the per-rank
    terms off (pure CE), 2 x 16 rows train exactly what 1 x 32 rows do."""
    two = launch(SCRIPT, _flags(tmp_path, "full", 16), num_processes=2, cwd=ROOT)
    assert [r.values["num_processes"] for r in two] == [2, 2]
    assert two[0].values["faa"] == two[1].values["faa"]
    for name, tensor in two[0].tensors.items():
        assert torch.equal(tensor, two[1].tensors[name]), name
    plain = ("--hierarchical", "false", "--hide_reg", "0")
    two = launch(SCRIPT, _flags(tmp_path, "two", 16, *plain), num_processes=2, cwd=ROOT)
    one = launch(SCRIPT, _flags(tmp_path, "one", 32, *plain), num_processes=1, cwd=ROOT)
    assert two[0].values["global_step"] == one[0].values["global_step"]
    prompts = [n for n in one[0].tensors if "prompt_pool_prompts" in n]
    assert prompts
    for name in prompts + [n for n in one[0].tensors if "classifier" in n]:
        torch.testing.assert_close(two[0].tensors[name], one[0].tensors[name], rtol=1e-5, atol=1e-6)

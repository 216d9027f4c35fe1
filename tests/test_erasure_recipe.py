"""The erasure recipe (tiny offline pipeline) and the benchmark's smoke run."""

from __future__ import annotations

import json

import pytest
import torch

from hf_extensions.hub import read_model_card_metadata
from hf_extensions.pipelines.vocabulary import common_words
from recipes.erasure.train import main

FAST = ["--num_steps", "3", "--k_closest", "6", "--num_centers", "3", "--eval_samples", "1"]
WORDS = ["--candidates", "dog", "cat", "tree", "house", "car", "boat"]


def test_recipe_erases_saves_full_pipeline_and_reloads(tmp_path):
    results = main(
        [
            "--config",
            "recipes/erasure/tiny.yaml",
            "--output_dir",
            str(tmp_path),
            "--save_mode",
            "full",
            *FAST,
            *WORDS,
        ]
    )
    metrics = results["metrics"]
    assert metrics["reload_generates_identically"] == 1.0
    assert 0 < metrics["erasure_gap"] < 1  # the concept moved towards its ESD target
    assert metrics["preserved_drift"] > 0 and metrics["heldout_drift"] > 0
    assert (tmp_path / "pipeline" / "model_index.json").is_file()
    card = read_model_card_metadata(tmp_path / "pipeline")
    assert card["hyperparameters"]["erased_concepts"] == ["a red circle"]
    assert card["metrics"]["erasure_gap"] == metrics["erasure_gap"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["num_steps"] == 3 and saved["arguments"]["method"] == "eap"


def test_benchmark_matches_esd_at_the_eap_erasure_gap():
    from benchmarks.erasure import _checkpoints, matched_esd

    path = [
        {"erasure_gap": 0.8, "preserved_drift": 0.1, "heldout_drift": 0.2},
        {"erasure_gap": 0.2, "preserved_drift": 0.7, "heldout_drift": 0.8},
        {"erasure_gap": 0.4, "preserved_drift": 0.5, "heldout_drift": 0.6},
    ]
    matched = matched_esd(path, 0.3)
    assert matched["preserved_drift"] == pytest.approx(0.6)
    assert matched["heldout_drift"] == pytest.approx(0.7)
    assert matched["in_range"] == 1.0 and matched_esd(path, 0.9)["in_range"] == 0.0
    assert _checkpoints(80) == [5, 10, 20, 40, 80]


@pytest.mark.parametrize("setting", ["sd14_objects", "sd14_nudity", "sd14_artists", "tiny"])
def test_settings_parse_and_validate(setting):
    from hf_extensions.cli import RecipeArgumentParser
    from hf_extensions.pipelines import ErasureConfig
    from recipes.erasure.train import ErasureRecipeArguments

    parser = RecipeArgumentParser((ErasureRecipeArguments, ErasureConfig))
    args, config = parser.parse(["--config", f"recipes/erasure/{setting}.yaml"])
    assert args.concepts and config.num_centers <= (config.k_closest or len(common_words()) // 3)
    if setting != "tiny":
        assert args.model_name_or_path == "CompVis/stable-diffusion-v1-4"
        assert config.learning_rate == 1e-5 and config.num_steps == 1000
        expected = "noxattn" if setting == "sd14_nudity" else "xattn"
        assert config.parameter_group == expected


def test_accelerate_launch_bf16_runs_the_erasure_in_bf16(tmp_path, monkeypatch):
    """`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION=bf16; the
    recipe's erasure step must then run its UNet forwards under bf16 autocast (the config's
    mixed_precision, unset in the YAMLs, used to pin "no" and override the launcher)."""
    from accelerate.state import AcceleratorState

    from hf_extensions.pipelines import erasure

    seen = []
    unet_forward = erasure._eps

    def recording(unet, latents, timestep, cond):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return unet_forward(unet, latents, timestep, cond)

    monkeypatch.setattr(erasure, "_eps", recording)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        config = ["--num_steps", "1", "--evaluate", "false", "--save_mode", "changed"]
        main(["--config", "recipes/erasure/tiny.yaml", "--output_dir", str(tmp_path), *config,
              "--k_closest", "6", "--num_centers", "3", *WORDS])  # fmt: skip
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert seen and set(seen) == {torch.bfloat16}  # every forward of the erasure step


def test_sd14_settings_leave_mixed_precision_to_the_launcher():
    from hf_extensions.cli import RecipeArgumentParser
    from hf_extensions.pipelines import ErasureConfig
    from recipes.erasure.train import ErasureRecipeArguments

    parser = RecipeArgumentParser((ErasureRecipeArguments, ErasureConfig))
    for setting in ("sd14_objects", "sd14_nudity", "sd14_artists"):
        _, config = parser.parse(["--config", f"recipes/erasure/{setting}.yaml"])
        assert config.mixed_precision is None
    assert ErasureConfig().mixed_precision is None
    assert parser.parse(["--mixed_precision", "fp16"])[1].mixed_precision == "fp16"

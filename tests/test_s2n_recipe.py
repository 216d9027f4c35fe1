"""The S2N recipe: YAML settings, the sweep on a pipeline loaded from a folder (the Hub-id code
path), the saved pipeline with its card, and the push to a (fake) Hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from diffusers import DiffusionPipeline

from hf_extensions.cli import RecipeArgumentParser
from hf_extensions.hub import read_model_card_metadata
from hf_extensions.models import tiny_stable_diffusion_pipeline
from hf_extensions.schedulers import S2NGeneralizedScheduler
from hf_extensions.testing import fake_hub
from recipes.s2n.sample import S2NSampleArguments, main

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes" / "s2n"


def test_yaml_settings_parse_and_validate():
    parser = RecipeArgumentParser((S2NSampleArguments,))
    (tiny,) = parser.parse(["--config", str(RECIPE_DIR / "tiny.yaml"), "--rhos", "0", "0.3"])
    assert tiny.rhos == [0.0, 0.3] and tiny.model_name_or_path is None and tiny.save_pipeline
    (sd15,) = RecipeArgumentParser((S2NSampleArguments,)).parse(
        ["--config", str(RECIPE_DIR / "sd15.yaml")]
    )
    assert sd15.model_name_or_path == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert 1.0 in sd15.rhos and sd15.torch_dtype == "float16"
    with pytest.raises(ValueError, match="rhos"):
        S2NSampleArguments(rhos=[-1.0])
    with pytest.raises(ValueError, match="solver_order"):
        S2NSampleArguments(solver_order=3)
    with pytest.raises(ValueError, match="hub_model_id"):
        S2NSampleArguments(push_to_hub=True, save_pipeline=True)


def test_sweep_on_a_saved_pipeline_then_save_and_push(tmp_path):
    base = tmp_path / "base"
    tiny_stable_diffusion_pipeline().save_pretrained(base)  # stands in for a Hub id
    output_dir = tmp_path / "out"
    with fake_hub(tmp_path / "hub") as hub:
        results = main(
            [
                "--config", str(RECIPE_DIR / "tiny.yaml"),
                "--model_name_or_path", str(base),
                "--output_dir", str(output_dir),
                "--rhos", "0", "1",
                "--num_inference_steps", "3",
                "--num_images", "1",
                "--pipeline_rho", "0.5",
                "--push_to_hub", "true",
                "--hub_model_id", "fake-user/tiny-s2n",
            ]
        )  # fmt: skip
        pushed = hub.repo_path("fake-user/tiny-s2n")
    # ρ = 0 is DDIM and ρ = 1 is DDIM eta 1 through the real pipeline; ρ = 1 moves the image.
    assert results["max_abs_diff_rho0_vs_ddim"] < 1e-5
    assert results["max_abs_diff_rho1_vs_ddim_eta1"] < 1e-5
    by_rho = {s["rho"]: s["mean_abs_diff_vs_ddim"] for s in results["settings"]}
    assert by_rho[1.0] > 1e-3 > by_rho[0.0]
    assert results["reload_keeps_class_and_rho"] == 1.0
    assert json.loads((output_dir / "sweep.json").read_text())["settings"]
    assert (output_dir / "images" / "steps3_rho1_0.png").exists()
    for folder in (output_dir / "pipeline", pushed):
        pipe = DiffusionPipeline.from_pretrained(folder)
        assert type(pipe.scheduler) is S2NGeneralizedScheduler
        assert pipe.scheduler.config.rho == 0.5
        metadata = read_model_card_metadata(folder / "README.md")
        assert metadata["method"] == "s2n-scheduler"
        assert metadata["hyperparameters"]["rho"] == 0.5

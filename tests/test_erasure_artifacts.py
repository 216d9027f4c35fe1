"""Erased pipelines save, reload and generate deterministically; the card says what was done."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from hf_extensions.hub import read_model_card_metadata
from hf_extensions.models import tiny_stable_diffusion_pipeline
from hf_extensions.pipelines import (
    ErasureConfig,
    erase_concepts,
    load_erased,
    push_erased_to_hub,
    save_erased,
)
from hf_extensions.pipelines.artifacts import CONFIG_NAME, WEIGHTS_NAME
from hf_extensions.testing import fake_hub

CONCEPT = "a red circle"


@pytest.fixture(scope="module")
def erased():
    config = ErasureConfig(
        num_steps=3,
        learning_rate=1e-2,
        ddim_steps=3,
        progress_bar=False,
        candidates=["dog", "cat", "tree", "house", "car", "boat"],
        k_closest=6,
        num_centers=3,
    )
    pipe = erase_concepts(tiny_stable_diffusion_pipeline(), [CONCEPT], "eap", config)
    pipe.erasure_result.metrics["preserved_drift"] = 0.25
    return pipe


def _generate(pipe) -> np.ndarray:
    out = pipe(
        CONCEPT,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return out.images


def test_full_save_reloads_and_generates_identically(erased, tmp_path):
    save_erased(erased, tmp_path, base_model="tiny", metrics={"erasure_gap": 0.5})
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(_generate(reloaded), _generate(erased))
    np.testing.assert_array_equal(_generate(erased), _generate(erased))
    assert not np.array_equal(_generate(tiny_stable_diffusion_pipeline()), _generate(erased))
    meta = read_model_card_metadata(tmp_path)
    assert meta["method"] == "eap-concept-erasure" and meta["library_name"] == "diffusers"
    hyper = meta["hyperparameters"]
    assert hyper["erased_concepts"] == [CONCEPT] and hyper["parameter_group"] == "xattn"
    found = erased.erasure_result.adversarial_concepts[CONCEPT]["argmax"]
    assert hyper["adversarial_concepts"] == {CONCEPT: found}
    assert meta["metrics"] == {"preserved_drift": 0.25, "erasure_gap": 0.5}


def test_only_changed_tensors_apply_to_the_base_pipeline(erased, tmp_path):
    save_erased(erased, tmp_path, only_changed=True)
    assert (tmp_path / WEIGHTS_NAME).is_file() and not (tmp_path / "unet").exists()
    base = tiny_stable_diffusion_pipeline()
    load_erased(base, tmp_path)
    for (name, a), (_, b) in zip(base.unet.named_parameters(), erased.unet.named_parameters()):
        assert torch.equal(a, b), name
    np.testing.assert_array_equal(_generate(base), _generate(erased))
    assert base.erasure_result.concepts == [CONCEPT]

    record = json.loads((tmp_path / CONFIG_NAME).read_text())
    record["config"]["parameter_group"] = "selfattn"  # tensors now lie outside the group
    (tmp_path / CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="outside the recorded parameter group"):
        load_erased(tiny_stable_diffusion_pipeline(), tmp_path)
    record["config"]["parameter_group"] = "everything"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(record))
    with pytest.raises(ValueError, match="parameter_group"):
        load_erased(tiny_stable_diffusion_pipeline(), tmp_path)


def test_push_to_hub_lands_with_card(erased, tmp_path):
    with fake_hub(tmp_path / "hub") as hub:
        push_erased_to_hub(erased, "erased-tiny", only_changed=True)
        folder = hub.repo_path("erased-tiny")
        assert (folder / WEIGHTS_NAME).is_file() and (folder / "README.md").is_file()
        base = load_erased(tiny_stable_diffusion_pipeline(), folder)
    np.testing.assert_array_equal(_generate(base), _generate(erased))

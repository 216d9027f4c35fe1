"""The recipes' paths onto the zoo (hard digits + fixtures) and the scorer's recognition rate."""

from __future__ import annotations

import types

import pytest
import torch

from hf_extensions.demo import run_comparison
from hf_extensions.zoo.scoring import recognition_rate


class _Pipe:
    """A stand-in pipeline: every call returns the same images (``[N, 3, 4, 4]``)."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, num_inference_steps, guidance_scale, generator, output_type):
        self.calls.append((list(prompts), num_inference_steps, guidance_scale))
        return types.SimpleNamespace(images=torch.zeros(len(prompts), 3, 4, 4))


class _Classifier(torch.nn.Module):
    """Predicts ``answers[k]`` for the k-th image of each batch."""

    def __init__(self, answers, names):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answers = answers
        self.config = types.SimpleNamespace(id2label=dict(enumerate(names)))

    def forward(self, pixel_values):
        logits = torch.zeros(pixel_values.shape[0], len(self.config.id2label))
        logits[torch.arange(pixel_values.shape[0]), torch.tensor(self.answers)] = 1.0
        return types.SimpleNamespace(logits=logits)


def test_recognition_counts_samples_whose_class_word_is_in_the_prompt():
    names = ["seven red", "one blue", "seven blue"]
    classifier = _Classifier([0, 1, 2, 1], names)
    pipe = _Pipe()
    rate = recognition_rate(
        pipe, classifier, ["a handwritten seven", "a one in blue ink"], samples_per_prompt=4,
        num_inference_steps=5, guidance_scale=2.0,
    )  # fmt: skip
    # prompt 1: seven, one, seven, one -> 2 of 4; prompt 2: one twice -> 2 of 4
    assert rate == pytest.approx(4 / 8)
    assert pipe.calls[0] == (["a handwritten seven"] * 4, 5, 2.0)


def test_comparison_runs_the_baseline_with_its_flags_and_the_method_without(tmp_path):
    seen = []

    def recipe(argv):
        seen.append(argv)
        return None, {"acc": 0.5 if "--rho" in argv else 0.75}

    config = tmp_path / "setting.yaml"
    config.write_text("x: 1\n")
    compared = run_comparison(
        method=recipe, baseline_name="rho 0", baseline_flags=["--rho", "0"], config=config,
        summary={"accuracy": "acc"}, flags=["--seed", "1"],
    )  # fmt: skip
    assert compared.metrics == {"accuracy": (0.5, 0.75)}
    assert seen[0][-4:] == ["--seed", "1", "--rho", "0"] and seen[1][-2:] == ["--seed", "1"]


def test_pga_hard_digits_needs_a_clip_and_known_styles():
    from recipes.pga.train import PGAScriptArguments, _hard_digits
    from trainers.pga_config import PGAConfig

    config = PGAConfig(output_dir="unused")
    arguments = {"dataset_name": "hard_digits", "source_domains": ["noisy"]}
    with pytest.raises(ValueError, match="`model_name_or_path`"):
        _hard_digits(PGAScriptArguments(**arguments, target_domain_name="cluttered"), config)
    with pytest.raises(ValueError, match="target_domain_name"):
        _hard_digits(
            PGAScriptArguments(**arguments, model_name_or_path="zoo/clip", target_domain_name="x"),
            config,
        )


def test_continual_and_prefix_recipes_need_a_backbone_with_hard_digits():
    from recipes.hierarchical_cl.train import HierarchicalCLScriptArguments, _hard_digits
    from recipes.shared_prefix.train import ScriptArguments, _hard_digits_setup

    with pytest.raises(ValueError, match="`model_name_or_path`"):
        _hard_digits(HierarchicalCLScriptArguments(dataset_name="hard_digits"), None)
    with pytest.raises(ValueError, match="`model_name_or_path`"):
        _hard_digits_setup(ScriptArguments(dataset_name="hard_digits"), seed=0)


def test_s2n_scorer_needs_prompts():
    from recipes.s2n.sample import S2NSampleArguments

    with pytest.raises(ValueError, match="`score_prompts`"):
        S2NSampleArguments(scorer_name_or_path="zoo/digit_scorer")


def test_quantization_hard_digits_are_fine_labelled_from_their_split():
    from recipes.quantization.train import QuantizationRecipeArguments, _hard_digit_images

    args = QuantizationRecipeArguments(
        model_name_or_path="zoo/resnet20", dataset_name="hard_digits", hard_digits_colours=["red"]
    )
    images, labels = _hard_digit_images(args, "test", 12, seed=0)
    assert images.shape == (12, 3, 32, 32)
    assert labels.max() < 10  # one ink: fine label = digit


@pytest.mark.slow
@pytest.mark.parametrize("name", ["agnostic_sam", "fhbi", "bnn_mutual", "shared_prefix",
                                  "hierarchical_cl", "pga", "erasure", "quantization", "s2n",
                                  "prompt_dsi"])  # fmt: skip
def test_demo_entry_compares_finite_figures_on_its_fixture(name):
    import math

    from hf_extensions.demo import Comparison
    from recipes.demo import REGISTRY, run_entry

    assert name in REGISTRY
    result = run_entry(name)
    assert isinstance(result, Comparison) and result.metrics
    assert all(math.isfinite(v) for pair in result.metrics.values() for v in pair)
    if result.fixture:
        assert result.fixture_quality, "the fixture's own quality is reported"

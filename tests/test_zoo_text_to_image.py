"""The ``text_to_image`` and ``digit_scorer`` zoo fixtures: stock loading and prompt control."""

from __future__ import annotations

import pytest
import torch

from hf_extensions.data.hard_digits import fine_class_names
from hf_extensions.zoo import building, fixture_path, scorer, text_to_image


def _folder(name: str):
    """The committed fixture; a missing one fails, naming its build command."""
    return fixture_path(name)


def test_scorer_loads_with_its_labels_and_unnormalised_processor():
    from transformers import AutoImageProcessor

    folder = _folder("digit_scorer")
    model = scorer.load(folder)
    assert list(model.config.id2label.values()) == fine_class_names(scorer.COLOUR_NAMES)
    processor = AutoImageProcessor.from_pretrained(folder)
    assert not processor.do_normalize
    image = torch.rand(3, 32, 32)
    pixels = processor(images=(image * 255).round().byte().numpy(), return_tensors="pt")
    assert pixels.pixel_values.shape == (1, 3, 32, 32)
    assert float(pixels.pixel_values.max()) <= 1.0


def test_stock_pipeline_loads_and_the_prompt_sets_the_ink():
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    folder = _folder("text_to_image")
    record = building.read_quality(folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.safety_checker is None
    assert not pipe.config.requires_safety_checker
    assert isinstance(pipe.vae, AutoencoderKL)
    assert pipe.vae.config.scaling_factor == pytest.approx(record["scaling_factor"])
    assert record["quality"]["prompted_digit_accuracy"] >= 0.8
    pipe.set_progress_bar_config(disable=True)
    prompts = [
        f"a handwritten {digit} in {colour} ink on a plain dark background"
        for digit in ("three", "eight")
        for colour in scorer.COLOUR_NAMES
    ]
    images = pipe(
        prompts,
        num_inference_steps=10,
        guidance_scale=record["guidance_scale"],
        generator=torch.Generator().manual_seed(1),
        output_type="pt",
    ).images
    assert images.shape == (8, 3, 32, 32)
    _, colour = scorer.fine_to_labels(scorer.predict(scorer.load(_folder("digit_scorer")), images))
    expected = torch.arange(len(scorer.COLOUR_NAMES)).repeat(2)
    assert (colour == expected).float().mean() >= 0.75


def test_evaluation_prompts_cycle_over_digits_and_inks():
    texts, digits, colours = text_to_image.prompts()
    assert len(texts) == text_to_image.NUM_SAMPLES == 200
    assert texts[17] == "a handwritten seven in green ink on a plain dark background"
    assert (digits[17], colours[17]) == (7, 1)
    assert texts[40].endswith("on white paper")

"""Zoo fixtures ``vit`` and ``resnet20``: what their downstream users rely on beyond the generic
reload-and-re-measure check of ``tests/test_zoo.py``.

- the saved image processor turns a PIL image into the pixels the model was trained on, so a
  ``pipeline("image-classification", model=folder)`` classifies as the model does on tensors;
- the ViT's pretraining and held-out styles partition the six styles;
- the ResNet has the 40 fine classes and every layer of it is quantizable by MetaAug.

Skipped when the fixture is not built (``python -m hf_extensions.zoo build vit``).
"""

from __future__ import annotations

import torch
from PIL import Image

from hf_extensions.data.hard_digits import (
    COLOURS,
    DIGIT_WORDS,
    STYLES,
    fine_class_names,
    render_hard_digits,
)
from hf_extensions.zoo import fixture_path
from hf_extensions.zoo.building import read_quality


def _folder(name: str):
    """The committed fixture; a missing one fails, naming its build command."""
    return fixture_path(name)


def _pil(image: torch.Tensor) -> Image.Image:
    array = (image.permute(1, 2, 0) * 255).round().clamp(0, 255).byte().numpy()
    return Image.fromarray(array)


def _processor_matches_tensors(folder, model, batch) -> None:
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(folder)
    pixels = processor([_pil(image) for image in batch.images], return_tensors="pt")
    pixels = pixels["pixel_values"]
    assert pixels.shape == batch.images.shape
    assert (pixels - batch.images).abs().max().item() <= 0.5 / 255 + 1e-6  # only the uint8 step
    with torch.no_grad():
        from_pil = model(pixel_values=pixels).logits.argmax(-1)
        from_tensor = model(pixel_values=batch.images).logits.argmax(-1)
    assert (from_pil == from_tensor).float().mean().item() >= 0.9


def test_vit_styles_labels_and_processor():
    from transformers import ViTForImageClassification

    folder = _folder("vit")
    record = read_quality(folder)
    pretrain, held_out = record["pretrain_styles"], record["held_out_styles"]
    assert not set(pretrain) & set(held_out)
    assert sorted(pretrain + held_out) == sorted(STYLES)
    assert record["image_size"] == 32
    quality = record["quality"]
    assert max(quality.values()) < 0.99  # good but not saturated: room to fine-tune
    model = ViTForImageClassification.from_pretrained(folder).eval()
    assert [model.config.id2label[i] for i in range(10)] == list(DIGIT_WORDS)
    assert model.config.hidden_size == 64 and model.config.image_size == 32
    batch = render_hard_digits(16, split="test", styles=pretrain, colours=tuple(COLOURS), seed=3)
    _processor_matches_tensors(folder, model, batch)


def test_resnet20_fine_classes_pipeline_and_quantizable():
    from transformers import ResNetForImageClassification, pipeline

    from hf_extensions.quantization import MetaAugConfig
    from hf_extensions.quantization.modules import check_quantizable, quantizable_module_names

    folder = _folder("resnet20")
    colours = tuple(read_quality(folder)["colours"])
    model = ResNetForImageClassification.from_pretrained(folder).eval()
    names = fine_class_names(colours)
    assert (
        [model.config.id2label[i] for i in range(len(names))]
        == names
        == fine_class_names(("red", "green", "blue", "yellow"))
    )
    assert read_quality(folder)["quality"]["accuracy_test"] < 0.99  # not saturated
    config = MetaAugConfig(weight_bits=4, activation_bits=4)
    check_quantizable(model, config)
    convolutions = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert set(convolutions) < set(quantizable_module_names(model, config))
    batch = render_hard_digits(16, split="test", styles=tuple(STYLES), colours=colours, seed=3)
    _processor_matches_tensors(folder, model, batch)
    classify = pipeline("image-classification", model=str(folder), device="cpu")
    result = classify(_pil(batch.images[0]), top_k=3)
    assert len(result) == 3 and result[0]["label"] in names

"""Zoo fixture ``resnet20``: a ResNet-20-style CNN on the 40 fine classes of hard digits, the
float model that post-training quantization (BRECQ / QDrop / MetaAug) starts from.

The task is digit x ink (:data:`COLOURS`: red, green, blue, yellow; ``fine = digit * 4 + ink``)
over all six styles, trained on images of the ``train`` sources only and measured on images of
the unseen ``test`` sources. The training run is sized so the model is good but not saturated
(the old digits CNN was right on every calibration image with every quantization method, which
left nothing for the methods to differ on).

Architecture: transformers' ``ResNetForImageClassification`` with ``layer_type="basic"``,
``hidden_sizes=[16, 32, 64]`` and ``depths=[3, 3, 3]``: the 3 x 3 x 2 convolutions of the
CIFAR ResNet-20, plus its stem and classifier. transformers' stem is fixed (a 7x7 stride-2
convolution and a 3x3 stride-2 max-pool), unlike CIFAR's 3x3 stride-1 one, so a 32x32 image
gives feature maps 16 -> 8 (stem), then 8x8, 4x4 and 2x2 in the three stages. We keep
``downsample_in_first_stage=False`` (the default): with ``True`` the stages would run at 4x4,
2x2 and 1x1, and the last stage would see no spatial layout at all. We also keep the native
32x32 input rather than having the processor upsample to 64x64 (stages at 16, 8, 4 like
CIFAR's halved): that costs three times the compute per image, and the 2x2 last stage already
reaches the intended accuracy (a sharper model is not the point here). ``embedding_size=16``
makes the stem as wide as the first stage, so the first stage's layers all keep identity
shortcuts as in ResNet-20.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import ResNetConfig, ResNetForImageClassification

from hf_extensions.data.hard_digits import (
    STYLES,
    fine_class_names,
    render_hard_digits,
)
from hf_extensions.zoo import building
from hf_extensions.zoo.vit import image_processor, predictions

__all__ = ["DEFAULT_STEPS", "DESCRIPTION", "build", "evaluate"]

DESCRIPTION = "ResNet-20-style CNN on 40 fine hard-digit classes (digit x ink); PTQ's float model"
DEFAULT_STEPS = 1500
COLOURS = ("red", "green", "blue", "yellow")
TRAIN_IMAGES = 24576
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
EVAL_IMAGES = 2000
EVAL_SEED = 2026  # fixed: the evaluation set does not depend on the build's seed
_MODEL = {
    "num_channels": 3,
    "embedding_size": 16,
    "hidden_sizes": [16, 32, 64],
    "depths": [3, 3, 3],
    "layer_type": "basic",
    "downsample_in_first_stage": False,
}


def _measure(model: torch.nn.Module) -> dict[str, float]:
    batch = render_hard_digits(
        EVAL_IMAGES, split="test", styles=tuple(STYLES), colours=COLOURS, seed=EVAL_SEED
    )
    predicted = predictions(model, batch.images)
    return {
        "accuracy_test": (predicted == batch.fine).float().mean().item(),
        "accuracy_test_digit": (predicted // len(COLOURS) == batch.digits).float().mean().item(),
    }


def evaluate(folder: str | Path) -> dict[str, float]:
    """Reload ``folder`` with the stock ``ResNetForImageClassification.from_pretrained`` and
    re-measure the metrics of its ``quality.json``."""
    model = ResNetForImageClassification.from_pretrained(folder, dtype=torch.float32)
    return _measure(model)


def _card(quality, curve, seconds, steps, parameters) -> str:
    data = (
        f"{TRAIN_IMAGES:,} hard digits (`hf_extensions.data.hard_digits`, 32x32 RGB) rendered "
        f"once from the `train` sources only, in all six styles ({', '.join(STYLES)}) and the "
        f"inks {', '.join(COLOURS)}; no other augmentation. Task: the 40 fine classes "
        "`digit * 4 + ink` (names `fine_class_names`, e.g. `seven red`). Quality: on "
        f"{EVAL_IMAGES} images of the unseen `test` sources (same styles and inks, seed "
        f"{EVAL_SEED}): fine accuracy, and the digit accuracy of the predicted fine class."
    )
    model = (
        "`ResNetForImageClassification` (ResNet-20 style): basic layers, stages of widths "
        "16/32/64 with 3 layers each, stem 16 channels (transformers' 7x7 stride-2 convolution "
        "and max-pool: stages at 8x8, 4x4 and 2x2 for a 32x32 image), batch norm; "
        f"{parameters:,} parameters, float32. Input: pixel values in [0, 1] (not normalised; "
        "the saved `ViTImageProcessorPil` rescales a PIL image so, and "
        '`pipeline("image-classification", model="zoo/resnet20")` works). Trained with AdamW '
        f"(lr {LEARNING_RATE}, weight decay 0.05, warm-up then cosine), {steps} steps of "
        f"{BATCH_SIZE} images."
    )
    load = (
        "from transformers import ResNetForImageClassification, ViTImageProcessorPil\n"
        'model = ResNetForImageClassification.from_pretrained("zoo/resnet20")\n'
        'processor = ViTImageProcessorPil.from_pretrained("zoo/resnet20")'
    )
    summary = (
        "A ResNet-20-style CNN trained on the 40 fine classes of hard digits: the float model "
        "that the post-training quantization methods (BRECQ, QDrop, MetaAug) calibrate."
    )
    return building.card_text(
        "resnet20",
        summary,
        data=data,
        model=model,
        load=load,
        quality=quality,
        curve=curve,
        seconds=seconds,
    )


def build(options: building.BuildOptions) -> Path:
    """Train the CNN for ``options.steps`` (default :data:`DEFAULT_STEPS`) steps and save the
    fixture folder to ``options.output_dir``."""
    timer = building.Timer()
    steps = options.steps or DEFAULT_STEPS
    data = render_hard_digits(
        TRAIN_IMAGES, split="train", styles=tuple(STYLES), colours=COLOURS, seed=options.seed
    )
    labels = data.fine
    names = fine_class_names(COLOURS)
    torch.manual_seed(options.seed)
    config = ResNetConfig(
        **_MODEL,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )
    model = ResNetForImageClassification(config).train()

    def step_loss(step: int) -> torch.Tensor:
        rows = building.keyed_batches(len(data), BATCH_SIZE, step, options.seed)
        return F.cross_entropy(model(pixel_values=data.images[rows]).logits, labels[rows])

    parameters = [p for p in model.parameters() if p.requires_grad]
    curve = building.train(
        parameters,
        step_loss,
        steps=steps,
        lr=LEARNING_RATE,
        description="zoo/resnet20",
        progress=options.progress,
    )
    model = model.to(torch.float32).eval()
    quality = _measure(model)
    count = sum(p.numel() for p in model.parameters())
    processor = image_processor()

    def save_model(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    card = _card(quality, curve, timer.seconds(), steps, count)
    extra = {
        "styles": list(STYLES),
        "colours": list(COLOURS),
        "train_sources": "train",
        "eval_sources": "test",
        "image_size": 32,
        "train_images": TRAIN_IMAGES,
        "steps": steps,
        "seed": options.seed,
        "parameters": count,
    }
    return building.save_fixture(
        options.output_dir, save_model, card=card, quality=quality, curve=curve, extra=extra
    )

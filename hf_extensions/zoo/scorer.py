"""Zoo fixture ``digit_scorer``: a small ResNet that scores generated hard digits.

It classifies a 32x32 RGB image into the *fine* classes digit x ink colour of the
``text_to_image`` fixture's training data (the same styles and inks), so that a generated sample
can be checked for the prompted digit and colour (``prompted_digit_accuracy`` of
:mod:`hf_extensions.zoo.text_to_image`). It is trained on hard digits of the ``pretrain`` and
``train`` sources, with a little extra blur and noise so that it tolerates the slight blur of
decoded latents, and measured on images of the ``test`` sources (handwriting it never saw).

    model = ResNetForImageClassification.from_pretrained("zoo/digit_scorer")
    processor = AutoImageProcessor.from_pretrained("zoo/digit_scorer")  # pixels in [0, 1]
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from hf_extensions.data import rendering
from hf_extensions.data.hard_digits import (
    COLOURS,
    DIGIT_WORDS,
    IMAGE_SIZE,
    STYLES,
    fine_class_names,
    render_hard_digits,
)
from hf_extensions.seeding import keyed_generator
from hf_extensions.zoo import building

__all__ = ["COLOUR_NAMES", "DEFAULT_STEPS", "DESCRIPTION", "STYLE_NAMES", "build", "evaluate"]

DESCRIPTION = "ResNet scoring 32x32 hard digits into digit x ink (4 inks, plain/paper styles)"
DEFAULT_STEPS = 800
#: The inks and styles of the text-to-image fixture's data (its prompts use these words).
COLOUR_NAMES = ("red", "green", "blue", "yellow")
STYLE_NAMES = ("plain", "paper")
TRAIN_IMAGES = 12000  # per source split (pretrain, train)
TEST_IMAGES = 2000
BATCH_SIZE = 128
LEARNING_RATE = 3e-3


def _model(seed: int):
    from transformers import ResNetConfig, ResNetForImageClassification

    names = fine_class_names(COLOUR_NAMES)
    config = ResNetConfig(
        num_channels=3,
        embedding_size=32,
        hidden_sizes=[32, 64, 128],
        depths=[1, 1, 1],
        layer_type="basic",
        downsample_in_first_stage=False,
        id2label=dict(enumerate(names)),
        label2id={name: index for index, name in enumerate(names)},
    )
    torch.manual_seed(seed)
    return ResNetForImageClassification(config)


def _processor():
    from transformers import ViTImageProcessor

    # Pixels in [0, 1]: PIL images are rescaled by 1/255 and not normalised.
    return ViTImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=False,
    )


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur a third of the images (sigma 0.5-1.0) and add noise (sd up to 0.06) to a third."""
    n = images.shape[0]
    out = images.clone()
    blur = torch.rand(n, generator=generator) < 1 / 3
    if blur.any():
        sigma = 0.5 + 0.5 * float(torch.rand(1, generator=generator))
        out[blur] = rendering.gaussian_blur(out[blur], sigma)
    noisy = (torch.rand(n, generator=generator) < 1 / 3).float().view(n, 1, 1, 1)
    sd = 0.06 * torch.rand(n, 1, 1, 1, generator=generator)
    out = out + noisy * sd * torch.randn(out.shape, generator=generator)
    return out.clamp(0.0, 1.0)


def test_set():
    """The fixed evaluation set: ``TEST_IMAGES`` hard digits of the ``test`` sources."""
    return render_hard_digits(
        TEST_IMAGES, split="test", styles=STYLE_NAMES, colours=COLOUR_NAMES, seed=1
    )


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Fine-class predictions ``[N]`` of ``images`` ``[N, 3, 32, 32]`` in [0, 1]."""
    dtype = next(model.parameters()).dtype
    parts = [
        model(pixel_values=images[rows].to(dtype)).logits.argmax(-1)
        for rows in building.batches(images.shape[0], batch_size)
    ]
    return torch.cat(parts)


def fine_to_labels(fine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(digit, colour) of fine labels ``digit * len(COLOUR_NAMES) + colour``."""
    return fine // len(COLOUR_NAMES), fine % len(COLOUR_NAMES)


def _measure(model) -> dict[str, float]:
    data = test_set()
    fine = predict(model.eval(), data.images)
    digit, colour = fine_to_labels(fine)
    return {
        "accuracy_test": (fine == data.fine).float().mean().item(),
        "accuracy_test_digit": (digit == data.digits).float().mean().item(),
        "accuracy_test_colour": (colour == data.colours).float().mean().item(),
    }


def build(options: building.BuildOptions) -> Path:
    """Train the scorer for ``options.steps`` (default :data:`DEFAULT_STEPS`) AdamW steps of
    ``BATCH_SIZE`` images and save it to ``options.output_dir``."""
    timer = building.Timer()
    steps = options.steps or DEFAULT_STEPS
    parts = [
        render_hard_digits(
            TRAIN_IMAGES, split=split, styles=STYLE_NAMES, colours=COLOUR_NAMES, seed=options.seed
        )
        for split in ("pretrain", "train")
    ]
    images = torch.cat([part.images for part in parts])
    labels = torch.cat([part.fine for part in parts])
    model = _model(options.seed).train()

    def step_loss(step: int) -> torch.Tensor:
        rows = building.keyed_batches(images.shape[0], BATCH_SIZE, step, options.seed)
        batch = _augment(images[rows], keyed_generator(options.seed, step, 1))
        return F.cross_entropy(model(pixel_values=batch).logits, labels[rows])

    curve = building.train(
        list(model.parameters()),
        step_loss,
        steps=steps,
        lr=LEARNING_RATE,
        description="digit_scorer",
        progress=options.progress,
    )
    quality = _measure(model)
    processor = _processor()

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    card = building.card_text(
        "digit_scorer",
        "A small `ResNetForImageClassification` (3 basic stages of one block, widths 32/64/128) "
        "that scores 32x32 RGB hard digits into the 40 fine classes digit x ink colour "
        f"({', '.join(COLOUR_NAMES)}); `zoo/text_to_image` is measured with it (does a sample "
        "show the prompted digit in the prompted ink?).",
        data=(
            f"{2 * TRAIN_IMAGES} hard digits (`hf_extensions.data.hard_digits`) rendered from the "
            f"`pretrain` and `train` sources, styles {', '.join(STYLE_NAMES)} "
            f"({'; '.join(STYLES[s].phrase for s in STYLE_NAMES)}), inks "
            f"{', '.join(COLOUR_NAMES)}; a third of each batch blurred (sigma 0.5-1) and a third "
            f"given extra Gaussian noise (sd up to 0.06). Measured on {TEST_IMAGES} images of "
            "the `test` sources (unseen handwriting)."
        ),
        model=(
            f"{sum(p.numel() for p in model.parameters()):,} parameters; labels "
            f"`'<digit> <colour>'` (`id2label`, digit major: fine = digit * 4 + colour). The "
            "image processor resizes to 32x32 and rescales PIL pixels to [0, 1] (no "
            f"normalisation). {steps} AdamW steps of {BATCH_SIZE}, lr {LEARNING_RATE}."
        ),
        load=(
            "from transformers import AutoImageProcessor, ResNetForImageClassification\n"
            'model = ResNetForImageClassification.from_pretrained("zoo/digit_scorer")\n'
            'processor = AutoImageProcessor.from_pretrained("zoo/digit_scorer")\n'
            "# tensors already in [0, 1]: model(pixel_values=images).logits"
        ),
        quality=quality,
        curve=curve,
        seconds=timer.seconds(),
    )
    extra = {
        "styles": list(STYLE_NAMES),
        "colours": list(COLOUR_NAMES),
        "digits": list(DIGIT_WORDS),
        "test_images": TEST_IMAGES,
        "ink_rgb": {name: list(COLOURS[name]) for name in COLOUR_NAMES},
    }
    return building.save_fixture(
        options.output_dir, save, card=card, quality=quality, curve=curve, extra=extra
    )


def load(folder: str | Path):
    """The scorer of a built folder, with the stock ``from_pretrained``, in eval mode."""
    from transformers import ResNetForImageClassification

    return ResNetForImageClassification.from_pretrained(folder).eval()


def evaluate(folder: str | Path) -> dict[str, float]:
    """Reload ``folder`` and re-measure the metrics of its ``quality.json``."""
    return _measure(load(folder))

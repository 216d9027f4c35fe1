"""Zoo fixture ``vit``: a small ViT pretrained on hard digits, the backbone of the downstream
methods (SAM family, FHBI, BNN, shared prefix, hierarchical continual learning).

Pretraining is the 10-digit classification of images rendered from the ``pretrain`` sources in
the styles :data:`PRETRAIN_STYLES`, in all six inks. The styles :data:`HELD_OUT_STYLES` and the
``train`` / ``validation`` / ``test`` sources are left to the downstream tasks, so a fine-tuned
model meets unseen handwriting, and (if the task wants) unseen domains. Quality is digit accuracy
on images of the ``test`` sources, in the pretraining styles and in the held-out ones.

The model takes pixel values in [0, 1] (not normalised), as the project's image-classification
recipes feed them; the saved :class:`~transformers.ViTImageProcessorPil` turns a PIL image into
them (resize to 32x32, rescale by 1/255).

Patch size 8 (16 patches), not 4 (64 patches): with patch 4 the model costs about four times
as much per image, and within the build budget (about 12 minutes on one thread) it stayed far
from a useful backbone: 1,200 steps of 128 images reached 67.8% digit accuracy on the
pretraining styles (68.8% held out), 2,400 steps of 64 images 71.2% (73.9%); its loss
plateaus at ln 10 for the first ~150 steps and then falls slowly. Patch 8 sees four times the
images in the same time.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

from hf_extensions.data.hard_digits import (
    COLOURS,
    DIGIT_WORDS,
    IMAGE_SIZE,
    SOURCE_SPLITS,
    render_hard_digits,
)
from hf_extensions.zoo import building

__all__ = ["DEFAULT_STEPS", "DESCRIPTION", "build", "evaluate"]

DESCRIPTION = "ViT (4 layers, hidden 64, patch 8) pretrained on hard digits; downstream backbone"
DEFAULT_STEPS = 4000
PRETRAIN_STYLES = ("plain", "noisy", "striped", "paper")
HELD_OUT_STYLES = ("cluttered", "blurred")
TRAIN_IMAGES = 49152
BATCH_SIZE = 128
LEARNING_RATE = 2e-3
EVAL_IMAGES = 2000
EVAL_SEED = 2026  # fixed: the evaluation sets do not depend on the build's seed
_MODEL = {
    "image_size": IMAGE_SIZE,
    "patch_size": 8,
    "num_channels": 3,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


def image_processor() -> ViTImageProcessorPil:
    """What turns a PIL image into the pixels the zoo's vision models were trained on: RGB,
    bilinear resize to 32x32, values in [0, 1], no normalisation."""
    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=Image.Resampling.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=False,
        do_convert_rgb=True,
    )


@torch.no_grad()
def predictions(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 500):
    """Arg-max class of every image, from ``model`` in eval mode (evaluation batches)."""
    model.eval()
    parts = [
        model(pixel_values=images[rows]).logits.argmax(-1)
        for rows in building.batches(len(images), batch_size)
    ]
    return torch.cat(parts)


def _evaluation_sets() -> dict[str, object]:
    colours = tuple(COLOURS)
    return {
        name: render_hard_digits(
            EVAL_IMAGES, split="test", styles=styles, colours=colours, seed=EVAL_SEED
        )
        for name, styles in (
            ("pretrain_styles", PRETRAIN_STYLES),
            ("held_out_styles", HELD_OUT_STYLES),
        )
    }


def _measure(model: torch.nn.Module) -> dict[str, float]:
    quality = {}
    for name, batch in _evaluation_sets().items():
        correct = predictions(model, batch.images) == batch.digits
        quality[f"accuracy_{name}"] = correct.float().mean().item()
    return quality


def evaluate(folder: str | Path) -> dict[str, float]:
    """Reload ``folder`` with the stock ``ViTForImageClassification.from_pretrained`` and
    re-measure the metrics of its ``quality.json``."""
    model = ViTForImageClassification.from_pretrained(folder, dtype=torch.float32)
    return _measure(model)


def _card(quality, curve, seconds, steps, parameters) -> str:
    data = (
        f"{TRAIN_IMAGES:,} hard digits (`hf_extensions.data.hard_digits`, 32x32 RGB) rendered "
        f"once from the `pretrain` sources ({SOURCE_SPLITS['pretrain']:.0%} of scikit-learn's "
        f"digits) in the styles {', '.join(PRETRAIN_STYLES)}, in all six inks "
        f"({', '.join(COLOURS)}); no other augmentation. Task: the 10 digits. Held out for the "
        f"downstream tasks: the styles {', '.join(HELD_OUT_STYLES)} and the `train`, "
        "`validation` and `test` sources. Quality: digit accuracy on "
        f"{EVAL_IMAGES} images of the `test` sources in the pretraining styles and "
        f"{EVAL_IMAGES} in the held-out styles (all six inks, seed {EVAL_SEED})."
    )
    model = (
        f"`ViTForImageClassification`: image 32, patch {_MODEL['patch_size']} "
        f"({(IMAGE_SIZE // _MODEL['patch_size']) ** 2} patches + [CLS]), 3 channels, "
        "hidden 64, 4 layers, 4 heads, MLP 128, no dropout; "
        f"{parameters:,} parameters, float32. Input: pixel values in [0, 1] (not normalised; "
        "the saved `ViTImageProcessorPil` rescales a PIL image so). Trained with AdamW "
        f"(lr {LEARNING_RATE}, weight decay 0.05, warm-up then cosine), {steps} steps of "
        f"{BATCH_SIZE} images."
    )
    load = (
        "from transformers import ViTForImageClassification, ViTImageProcessorPil\n"
        'model = ViTForImageClassification.from_pretrained("zoo/vit")\n'
        'processor = ViTImageProcessorPil.from_pretrained("zoo/vit")'
    )
    summary = (
        "A small ViT pretrained on the 10-digit task of hard digits, the backbone that the "
        "SAM-family, FHBI, BNN, shared-prefix and hierarchical-CL fixtures fine-tune."
    )
    return building.card_text(
        "vit",
        summary,
        data=data,
        model=model,
        load=load,
        quality=quality,
        curve=curve,
        seconds=seconds,
    )


def build(options: building.BuildOptions) -> Path:
    """Pretrain the ViT for ``options.steps`` (default :data:`DEFAULT_STEPS`) steps and save
    the fixture folder to ``options.output_dir``."""
    timer = building.Timer()
    steps = options.steps or DEFAULT_STEPS
    data = render_hard_digits(
        TRAIN_IMAGES,
        split="pretrain",
        styles=PRETRAIN_STYLES,
        colours=tuple(COLOURS),
        seed=options.seed,
    )
    torch.manual_seed(options.seed)
    config = ViTConfig(
        **_MODEL,
        num_labels=len(DIGIT_WORDS),
        id2label=dict(enumerate(DIGIT_WORDS)),
        label2id={word: i for i, word in enumerate(DIGIT_WORDS)},
    )
    model = ViTForImageClassification(config).train()

    def step_loss(step: int) -> torch.Tensor:
        rows = building.keyed_batches(len(data), BATCH_SIZE, step, options.seed)
        logits = model(pixel_values=data.images[rows]).logits
        return F.cross_entropy(logits, data.digits[rows])

    parameters = [p for p in model.parameters() if p.requires_grad]
    curve = building.train(
        parameters,
        step_loss,
        steps=steps,
        lr=LEARNING_RATE,
        description="zoo/vit",
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
        "pretrain_styles": list(PRETRAIN_STYLES),
        "held_out_styles": list(HELD_OUT_STYLES),
        "pretrain_sources": "pretrain",
        "colours": list(COLOURS),
        "image_size": IMAGE_SIZE,
        "train_images": TRAIN_IMAGES,
        "steps": steps,
        "seed": options.seed,
        "parameters": count,
    }
    return building.save_fixture(
        options.output_dir, save_model, card=card, quality=quality, curve=curve, extra=extra
    )

"""Data and model of the image-classification recipes (example, Agnostic-SAM, ...).

One place builds what every image-classification recipe trains on:

- the embedded default: scikit-learn's digits (offline), optionally with symmetric label noise on
  the training split, and a tiny ViT built from a config;
- the embedded hard digits (``dataset_name: hard_digits``; :mod:`hf_extensions.data.hard_digits`:
  32x32 RGB digits in coloured inks and named styles), with the zoo's pretrained ViT
  (``model_name_or_path: zoo/vit``) or a tiny ViT;
- a real run: a Hub (or local) image dataset through ``datasets.load_dataset`` (e.g.
  ``uoft-cs/cifar100`` with ``image_column: img``, ``label_column: fine_label``; or
  ``imagefolder`` with ``data_dir``) and a Hub checkpoint whose image processor prepares the
  pixels and whose head is replaced by one of the dataset's classes.

Splits are always ``train`` / ``validation`` / ``test``; a dataset without a validation split
gets one carved, stratified by class, out of its training split. :func:`train_image_classifier`
is the build → train → finish part of their recipes (see :mod:`hf_extensions.cli`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, DatasetDict, load_dataset
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTImageProcessorPil

from hf_extensions.cli import finish_training, run_training
from hf_extensions.data import CLASS_NAMES, add_label_noise, load_digits
from hf_extensions.data.hard_digits import COLOURS, LABELS, STYLES, load_hard_digits
from hf_extensions.data.hard_digits import IMAGE_SIZE as HARD_DIGITS_SIZE
from hf_extensions.metrics import compute_classification_metrics
from hf_extensions.models.tiny import tiny_vit_classifier
from hf_extensions.validation import (
    MAX_SEED,
    check_choice,
    check_integer,
    check_names,
    check_range,
    check_text,
    refuse,
)

#: ``dataset_name`` of the embedded hard digits (not a Hub dataset).
HARD_DIGITS = "hard_digits"
#: Attention heads of the tiny ViT built when no checkpoint is given (``hidden_size`` is a
#: multiple of it).
TINY_VIT_HEADS = 4


@dataclass
class ImageClassificationArguments:
    """What to train on and which model to start from."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local path of an image classifier to fine-tune (e.g. "
            "google/vit-base-patch16-224-in21k). Empty: a tiny ViT built from a config (offline)."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Dataset for datasets.load_dataset (Hub id, or a builder such as 'imagefolder'). "
            "Empty: scikit-learn's digits (offline); 'hard_digits': the embedded hard digits."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration name of the dataset."}
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "data_dir for load_dataset (e.g. an imagefolder)."}
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the labels."})
    validation_size: float = field(
        default=0.1,
        metadata={"help": "Fraction of train carved out as validation when there is none."},
    )
    image_size: int = field(default=8, metadata={"help": "Digits: side they are resized to."})
    num_channels: int = field(
        default=3,
        metadata={
            "help": "Digits: channels the gray image is repeated into (3: RGB, what the "
            "transformers image pipelines feed a model)."
        },
    )
    patch_size: int = field(
        default=2, metadata={"help": "Patch size of the tiny ViT (no checkpoint)."}
    )
    hidden_size: int = field(
        default=32, metadata={"help": "Width of the tiny ViT (no checkpoint)."}
    )
    num_layers: int = field(default=2, metadata={"help": "Depth of the tiny ViT (no checkpoint)."})
    split_seed: int = field(
        default=0, metadata={"help": "Seed of the train/validation/test split."}
    )
    label_noise: float = field(
        default=0.0, metadata={"help": "Rate of symmetric label noise on the training split."}
    )
    hard_digits_styles: list[str] = field(
        default_factory=lambda: ["plain"],
        metadata={"help": f"Hard digits: the styles (domains) drawn from, of {list(STYLES)}."},
    )
    hard_digits_colours: list[str] = field(
        default_factory=lambda: ["red", "green", "blue", "yellow"],
        metadata={"help": f"Hard digits: the ink colours, of {list(COLOURS)}."},
    )
    hard_digits_label: str = field(
        default="digit",
        metadata={
            "help": f"Hard digits: the label to learn, one of {list(LABELS)} (fine: "
            "digit x colour)."
        },
    )
    hard_digits_train_images: int = field(
        default=2000, metadata={"help": "Hard digits: training images (from the train sources)."}
    )
    hard_digits_eval_images: int = field(
        default=1000,
        metadata={"help": "Hard digits: validation and test images each (their own sources)."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples (quick runs)."}
    )

    def __post_init__(self):
        for name in ("model_name_or_path", "dataset_name", "dataset_config_name", "data_dir"):
            if getattr(self, name) is not None:
                setattr(
                    self, name, check_text(name, getattr(self, name), "None or a non-empty string")
                )
        for name in ("image_column", "label_column"):
            setattr(self, name, check_text(name, getattr(self, name), "a column name"))
        for name in ("image_size", "num_channels", "num_layers"):
            setattr(self, name, check_integer(name, getattr(self, name), low=1))
        self.patch_size = check_integer("patch_size", self.patch_size, low=1)
        if self.patch_size > self.image_size:
            refuse("patch_size", f"at most `image_size` ({self.image_size})", self.patch_size)
        self.hidden_size = check_integer("hidden_size", self.hidden_size, low=TINY_VIT_HEADS)
        if self.hidden_size % TINY_VIT_HEADS:
            refuse(
                "hidden_size",
                f"a multiple of the tiny ViT's {TINY_VIT_HEADS} attention heads",
                self.hidden_size,
            )
        self.split_seed = check_integer("split_seed", self.split_seed, low=0, high=MAX_SEED)
        self.label_noise = check_range(
            "label_noise", self.label_noise, low=0.0, high=1.0, high_open=True
        )
        self.validation_size = check_range(
            "validation_size",
            self.validation_size,
            low=0.0,
            high=1.0,
            low_open=True,
            high_open=True,
        )
        if self.max_train_samples is not None:
            self.max_train_samples = check_integer(
                "max_train_samples", self.max_train_samples, low=1
            )
        self.hard_digits_label = check_choice("hard_digits_label", self.hard_digits_label, LABELS)
        for name in ("hard_digits_train_images", "hard_digits_eval_images"):
            setattr(self, name, check_integer(name, getattr(self, name), low=1))
        for name, known in (("hard_digits_styles", STYLES), ("hard_digits_colours", COLOURS)):
            for entry in check_names(name, getattr(self, name), optional=False):
                check_choice(name, entry, tuple(known))
        tiny_on_hard_digits = self.dataset_name == HARD_DIGITS and self.model_name_or_path is None
        if tiny_on_hard_digits and (self.image_size, self.num_channels) != (HARD_DIGITS_SIZE, 3):
            refuse(
                "image_size and num_channels",
                f"{HARD_DIGITS_SIZE} and 3 with dataset_name: {HARD_DIGITS} (32x32 RGB)",
                (self.image_size, self.num_channels),
            )
        if self.is_embedded:
            return
        if self.dataset_name is not None and self.model_name_or_path is None:
            raise ValueError(
                "`dataset_name` needs `model_name_or_path`: its image processor prepares the images."
            )

    @property
    def is_embedded(self) -> bool:
        """Whether the data ships with the project (the digits or the hard digits)."""
        return self.dataset_name in (None, HARD_DIGITS)


def class_names(data: DatasetDict) -> list[str]:
    """Names of the classes of the ``labels`` column."""
    feature = data["train"].features["labels"]
    return list(feature.names) if isinstance(feature, ClassLabel) else list(CLASS_NAMES)


def set_label_names(model, names: list[str]):
    """Record ``names`` as the model's ``id2label`` / ``label2id`` (what pipelines print)."""
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}
    return model


def build_image_processor(args: ImageClassificationArguments):
    """The image processor saved with the model: the checkpoint's, or for the digits one that
    gives what :func:`hf_extensions.data.load_digits` gives (bilinear resize to
    ``image_size``, pixels scaled to [0, 1], not normalised; RGB when ``num_channels`` is 3,
    else the image's own channels), so ``pipeline("image-classification", model=output_dir)``
    prepares an image as the model was trained."""
    if args.model_name_or_path is not None:
        return AutoImageProcessor.from_pretrained(args.model_name_or_path)
    return ViTImageProcessorPil(
        do_resize=True,
        size={"height": args.image_size, "width": args.image_size},
        resample=Image.Resampling.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=False,
        do_convert_rgb=args.num_channels == 3,
    )


def build_model(args: ImageClassificationArguments, names: list[str]):
    """A Hub checkpoint with a new head for ``names``, or a tiny ViT for the digits; either
    way with ``names`` as its label names."""
    if args.model_name_or_path is None:
        model = tiny_vit_classifier(
            num_labels=len(names),
            image_size=args.image_size,
            patch_size=args.patch_size,
            num_channels=args.num_channels,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_attention_heads=TINY_VIT_HEADS,
        )
        return set_label_names(model, names)
    return AutoModelForImageClassification.from_pretrained(
        args.model_name_or_path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        ignore_mismatched_sizes=True,
    )


def _load_hub_dataset(args: ImageClassificationArguments) -> DatasetDict:
    raw = load_dataset(args.dataset_name, args.dataset_config_name, data_dir=args.data_dir)
    raw = raw.rename_columns({args.image_column: "image", args.label_column: "labels"})
    if "test" not in raw:
        raise ValueError(f"{args.dataset_name!r} has no 'test' split (splits: {list(raw)}).")
    if "validation" not in raw:
        carved = raw["train"].train_test_split(
            test_size=args.validation_size,
            seed=args.split_seed,
            stratify_by_column="labels"
            if isinstance(raw["train"].features["labels"], ClassLabel)
            else None,
        )
        raw["train"], raw["validation"] = carved["train"], carved["test"]
    return DatasetDict({split: raw[split] for split in ("train", "validation", "test")})


def build_datasets(args: ImageClassificationArguments, seed: int) -> DatasetDict:
    """Train / validation / test with ``pixel_values`` and ``labels``; noisy train labels if asked.

    Label noise is drawn with ``seed`` (the training seed), the split with ``split_seed``.
    """
    if args.dataset_name is None:
        data = load_digits(
            args.split_seed, image_size=args.image_size, num_channels=args.num_channels
        )
    elif args.dataset_name == HARD_DIGITS:
        data = load_hard_digits(
            {
                "train": args.hard_digits_train_images,
                "validation": args.hard_digits_eval_images,
                "test": args.hard_digits_eval_images,
            },
            styles=args.hard_digits_styles,
            colours=args.hard_digits_colours,
            label=args.hard_digits_label,
            seed=args.split_seed,
        )
    else:
        data = _load_hub_dataset(args)
    train = data["train"]
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.label_noise > 0:
        train = add_label_noise(train, args.label_noise, seed=seed)
    data["train"] = train
    if args.model_name_or_path is None:
        return data
    processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    if args.is_embedded:  # arrays in [0, 1]: normalise as the checkpoint expects, if it does
        if not getattr(processor, "do_normalize", True):
            return data
        mean = np.asarray(processor.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(processor.image_std, dtype=np.float32)[:, None, None]

        def normalize(batch):
            pixels = np.asarray(batch["pixel_values"], dtype=np.float32)
            return {**batch, "pixel_values": (pixels - mean) / std}

        return data.with_transform(normalize)

    def preprocess(batch):
        images = [image.convert("RGB") for image in batch["image"]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": batch["labels"]}

    return data.with_transform(preprocess)


def pretrain_classifier(
    model,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 30,
    learning_rate: float = 3e-3,
    batch_size: int = 64,
    weight_decay: float = 0.05,
    seed: int = 0,
):
    """Train every weight of an image classifier from scratch (AdamW, cosine schedule).

    Not a method of this project: it stands in for upstream pretraining (ImageNet-21k for a
    ViT-B/16) when a recipe or benchmark needs a *pretrained* frozen backbone offline.
    Deterministic for a seed, so every process of a distributed launch builds the same
    backbone. Returns ``model`` in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    steps = max(1, epochs * -(-len(labels) // batch_size))
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            rows = order[start : start + batch_size]
            loss = F.cross_entropy(model(pixel_values=pixel_values[rows]).logits, labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def digits_backbone(
    upstream, *, seed: int, num_layers: int = 4, hidden_size: int = 32, epochs: int = 30
) -> torch.nn.Module:
    """A tiny ViT pretrained on the ``upstream`` digits images (a ``datasets.Dataset`` with
    ``pixel_values`` and ``labels``) by :func:`pretrain_classifier`, then given a fresh head: the
    frozen stand-in for an ImageNet-21k backbone in the continual-learning digits setting."""
    model = tiny_vit_classifier(num_layers=num_layers, hidden_size=hidden_size, seed=seed)
    pixels = torch.as_tensor(np.asarray(upstream["pixel_values"], dtype=np.float32))
    labels = torch.as_tensor(np.asarray(upstream["labels"]))
    pretrain_classifier(model, pixels, labels, epochs=epochs, seed=seed)
    torch.manual_seed(seed + 1)
    model.classifier.reset_parameters()  # the stream's classes are learned from scratch
    return model


def train_image_classifier(
    trainer_class: type,
    script_args: ImageClassificationArguments,
    training_args,
    model_builder: Callable[[list[str]], torch.nn.Module] | None = None,
    card: Callable[[dict[str, float]], object] | None = None,
):
    """Build the data and the model, train on ``train`` (validating on ``validation``), then
    test, save, and write or push the card: the build → train → finish steps of a recipe.

    The image processor (:func:`build_image_processor`) is the trainer's ``processing_class``,
    so it is saved (and pushed) with the model.

    Args:
        trainer_class (`type`):
            ``transformers.Trainer`` or a method trainer (``trainers.AgnosticSAMTrainer``, ...).
        script_args (`ImageClassificationArguments`):
            The data and the model to start from.
        training_args (`transformers.TrainingArguments`):
            The trainer's arguments (a method's config); ``remove_unused_columns`` is turned off
            for a Hub dataset, whose transform needs the image column.
        model_builder (`Callable[[list[str]], nn.Module]`, *optional*):
            Makes the model from the class names; defaults to :func:`build_model`.
        card (`Callable[[dict], ModelCard]`, *optional*):
            A stock ``Trainer``'s card (see :func:`hf_extensions.cli.finish_training`).

    Returns:
        `tuple`: ``(trainer, test_metrics)``.
    """
    if not script_args.is_embedded:
        training_args.remove_unused_columns = False  # the transform needs the image column
    data = build_datasets(script_args, seed=training_args.seed)
    names = class_names(data)
    model = model_builder(names) if model_builder else build_model(script_args, names)
    trainer = trainer_class(
        model=model,
        args=training_args,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=build_image_processor(script_args),
        compute_metrics=compute_classification_metrics,
    )
    run_training(trainer)
    dataset = {None: "scikit-learn digits", HARD_DIGITS: "hf-extensions hard digits"}.get(
        script_args.dataset_name, script_args.dataset_name
    )
    return trainer, finish_training(trainer, data["test"], dataset=dataset, card=card)

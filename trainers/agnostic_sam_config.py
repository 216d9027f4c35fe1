"""Configuration of :class:`trainers.AgnosticSAMTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hf_extensions.documentation import document_fields
from hf_extensions.validation import check_bool, check_choice, check_range
from trainers.perturbation_config import PerturbationConfig

FINAL_GRADIENT_SPLITS = ("full", "train", "sum")


@document_fields
@dataclass
class AgnosticSAMConfig(PerturbationConfig):
    """``TrainingArguments`` for Agnostic-SAM.

    Nguyen, Tran, Truong, Do, Phung, Le, "Agnostic Sharpness-Aware Minimization", arXiv
    2406.07107. Each mini-batch is split into a training part ``B_tr`` and a validation part
    ``B_val`` (the last ``val_fraction`` of its rows); the weights move *up* the training loss and
    *down* the validation loss, ``e = rho_train g_tr/||g_tr|| - rho_val g_val/||g_val||``, and
    the optimizer gets the gradient at ``theta + e``. The paper's exact variant cannot be recovered
    offline (the official repository holds a README only), so every choice is a field here.

    ``rho_val=0`` with ``val_fraction`` small is close to SAM; ``rho_train = rho_val = 0`` is
    exactly the Trainer's plain step (with ``final_grad_on="full"``).
    """

    rho_train: float = field(
        default=0.05, metadata={"help": "Radius of the ascent on the training split (sharpness)."}
    )
    rho_val: float = field(
        default=0.05,
        metadata={"help": "Radius of the descent on the validation split (the MAML-like step)."},
    )
    val_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Fraction of each (sharpness) batch used as the validation split, in (0, 1)."
        },
    )
    chain: bool = field(
        default=False,
        metadata={
            "help": "Take the validation gradient at theta + e_train (chained, as in OT-MDR) "
            "instead of at theta."
        },
    )
    final_grad_on: str = field(
        default="full",
        metadata={
            "help": "Loss whose gradient at theta + e reaches the optimizer: 'full' (the whole "
            "batch), 'train' (the training split) or 'sum' (training-split mean + "
            "validation-split mean).",
            "choices": FINAL_GRADIENT_SPLITS,
        },
    )

    fuse_split_passes: bool = field(
        default=False,
        metadata={
            "help": "Unchained steps of single-label classifiers: take g_tr and g_val from one "
            "forward pass over the whole batch (two autograd.grad calls, each a backward pass "
            "over the whole batch) instead of one pass per split. The same gradients for models "
            "without BatchNorm or dropout; one forward call fewer but half a backward pass more, "
            "which measured slower on CPU (benchmarks/agnostic_sam.py); other losses always "
            "take one pass per split."
        },
    )

    method_fields: ClassVar[tuple[str, ...]] = (
        "rho_train",
        "rho_val",
        "val_fraction",
        "chain",
        "final_grad_on",
        "fuse_split_passes",
    )

    def __post_init__(self):
        super().__post_init__()
        self.rho_train = check_range("rho_train", self.rho_train, low=0.0)
        self.rho_val = check_range("rho_val", self.rho_val, low=0.0)
        self.val_fraction = check_range(
            "val_fraction", self.val_fraction, low=0.0, high=1.0, low_open=True, high_open=True
        )
        self.chain = check_bool("chain", self.chain)
        self.fuse_split_passes = check_bool("fuse_split_passes", self.fuse_split_passes)
        self.final_grad_on = check_choice(
            "final_grad_on", self.final_grad_on, FINAL_GRADIENT_SPLITS
        )
        # Each perturbation splits its rows into B_tr and B_val: one row cannot be split, and
        # every step would silently be a SAM step of radius rho_train.
        for name in ("per_device_train_batch_size", "sharpness_batch_size"):
            rows = getattr(self, name)
            if rows is not None and rows < 2:
                raise ValueError(
                    f"`{name}`={rows}: Agnostic-SAM splits each perturbation's rows into a "
                    "training and a validation part, which needs at least 2 rows (with 1 every "
                    f"step would be a plain SAM step). Set `{name}` >= 2 (lower "
                    "`gradient_accumulation_steps` to keep the same global batch)."
                )

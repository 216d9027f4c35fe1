"""Configuration of :class:`trainers.SAMTrainer` (SAM and ASAM)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hf_extensions.documentation import document_fields
from hf_extensions.validation import check_range
from trainers.perturbation_config import PerturbationConfig


@document_fields
@dataclass
class SAMConfig(PerturbationConfig):
    """``TrainingArguments`` for Sharpness-Aware Minimization.

    SAM: Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
    ICLR 2021 (arXiv 2010.01412). ASAM (``adaptive=True``): Kwon et al., "ASAM: Adaptive
    Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML 2021
    (arXiv 2102.11600). ``rho=0`` is exactly the Trainer's plain optimizer step.

    Example::

        args = SAMConfig(output_dir="out", rho=0.05, learning_rate=0.1, optim="sgd")
        SAMTrainer(model=model, args=args, train_dataset=train).train()
    """

    rho: float = field(
        default=0.05,
        metadata={"help": "Radius of the ascent step (Foret et al.: 0.05; ASAM: about 0.5-2.0)."},
    )

    method_fields: ClassVar[tuple[str, ...]] = ("rho",)

    def __post_init__(self):
        super().__post_init__()
        self.rho = check_range("rho", self.rho, low=0.0)

"""Base of every hf-extensions training config: field validation and the model-card settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from transformers import TrainingArguments

from hf_extensions.validation import MAX_SEED, check_integer, check_range


@dataclass
class MethodConfig(TrainingArguments):
    """``TrainingArguments`` of a method: subclasses add fields and list them in ``method_fields``.

    :meth:`method_hyperparameters` is what the model card records: the method's own fields plus
    the optimisation settings needed to reproduce a run.
    """

    #: Names of the fields that define the method (recorded in model cards); subclasses extend it.
    method_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        self._check_optimisation_fields()
        super().__post_init__()

    def _check_optimisation_fields(self) -> None:
        """The ``TrainingArguments`` numbers a run depends on, checked before anything is set up
        (stock ``TrainingArguments`` takes a NaN learning rate and trains NaN weights with it)."""
        for name in ("learning_rate", "weight_decay", "num_train_epochs"):
            setattr(self, name, check_range(name, getattr(self, name), low=0.0))
        # Adam divides by sqrt(v) + eps: with eps = 0 a zero gradient gives 0 / 0 = NaN
        self.adam_epsilon = check_range("adam_epsilon", self.adam_epsilon, low=0.0, low_open=True)
        for name in ("adam_beta1", "adam_beta2"):  # torch's Adam: 0 <= beta < 1
            value = check_range(name, getattr(self, name), low=0.0, high=1.0, high_open=True)
            setattr(self, name, value)
        if self.max_grad_norm is None:  # None and 0 both mean no clipping; one form is stored
            self.max_grad_norm = 0.0
        self.max_grad_norm = check_range("max_grad_norm", self.max_grad_norm, low=0.0)
        self.warmup_steps = check_range("warmup_steps", self.warmup_steps, low=0.0)
        self.max_steps = check_integer("max_steps", self.max_steps, low=-1)  # -1: use epochs
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        ):
            setattr(self, name, check_integer(name, getattr(self, name), low=1))
        self.seed = check_integer("seed", self.seed, low=0, high=MAX_SEED)

    def method_hyperparameters(self) -> dict[str, Any]:
        """The method's settings plus the optimisation settings that matter to reproduce a run."""
        values = {name: getattr(self, name) for name in self.method_fields}
        values.update(
            optim=str(getattr(self.optim, "value", self.optim)),
            learning_rate=self.learning_rate,
            num_train_epochs=self.num_train_epochs,
            per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            seed=self.seed,
        )
        return values

"""Base of every hf-extensions training config: field validation and the model-card settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from transformers import TrainingArguments


@dataclass
class MethodConfig(TrainingArguments):
    """``TrainingArguments`` of a method: subclasses add fields and list them in ``method_fields``.

    :meth:`method_hyperparameters` is what the model card records: the method's own fields plus
    the optimisation settings needed to reproduce a run.
    """

    #: Names of the fields that define the method (recorded in model cards); subclasses extend it.
    method_fields: ClassVar[tuple[str, ...]] = ()

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

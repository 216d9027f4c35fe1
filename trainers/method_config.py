"""Base of every hf-extensions training config: field validation and the model-card settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from transformers import TrainingArguments


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    """Refuse ``value`` for field ``name`` unless it is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")


def check_range(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Refuse a number outside ``[low, high]`` (``(`` / ``)`` with the ``*_open`` flags)."""
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "(" if low_open else "["
        right = ")" if high_open or high is None else "]"
        interval = (
            f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        )
        raise ValueError(f"`{name}` must be in {interval}, got {value!r}.")


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

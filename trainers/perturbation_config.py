"""Settings shared by every SAM-family trainer (SAM, ASAM, Agnostic-SAM, and later FHBI and PGA)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import TrainingArguments

from hf_extensions.perturbation import PERTURBATION_NORMS


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
class PerturbationConfig(TrainingArguments):
    """``TrainingArguments`` plus the knobs every weight-perturbation (SAM-family) method shares.

    The Trainer's own optimizer (``optim``), learning-rate schedule, gradient clipping
    (``max_grad_norm``), accumulation, logging and checkpointing apply unchanged: the methods only
    change which gradient reaches the optimizer (see :mod:`hf_extensions.perturbation`).
    """

    adaptive: bool = field(
        default=False,
        metadata={
            "help": "Scale-invariant (ASAM, Kwon et al. 2021) perturbation: e = rho T^2 g / ||T g|| "
            "with T = |theta| + adaptive_eta. ASAM's paper uses a larger rho (e.g. 0.5-2.0)."
        },
    )
    adaptive_eta: float = field(
        default=0.01, metadata={"help": "eta of ASAM's normalisation operator T = |theta| + eta."}
    )
    perturb_norm: str = field(
        default="global",
        metadata={
            "help": "Norm of the perturbation radius: 'global' (over all parameters, the papers) "
            "or 'per_tensor' (every tensor gets radius rho).",
            "choices": PERTURBATION_NORMS,
        },
    )
    freeze_batchnorm_stats: bool = field(
        default=True,
        metadata={
            "help": "Keep BatchNorm running statistics from being updated by forward passes at "
            "perturbed weights."
        },
    )
    sharpness_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "m of m-sharpness (Foret et al. 2021, Sec. 4.1): examples whose gradient defines "
            "one perturbation. Default: the per-device micro-batch, so that each process and "
            "each accumulation micro-batch perturbs by its own gradient; set it to reproduce a "
            "multi-process or accumulated run on one device at the same global batch."
        },
    )

    #: Names of the fields that define the method (recorded in model cards); subclasses extend it.
    method_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        super().__post_init__()
        check_range("adaptive_eta", self.adaptive_eta, low=0.0)
        check_choice("perturb_norm", self.perturb_norm, PERTURBATION_NORMS)
        if self.sharpness_batch_size is not None:
            check_range("sharpness_batch_size", self.sharpness_batch_size, low=1)

    def method_hyperparameters(self) -> dict[str, Any]:
        """The method's settings plus the optimisation settings that matter to reproduce a run."""
        shared = ("adaptive", "adaptive_eta", "perturb_norm", "freeze_batchnorm_stats")
        names = (*self.method_fields, *shared, "sharpness_batch_size")
        values = {name: getattr(self, name) for name in names}
        values.update(
            optim=str(getattr(self.optim, "value", self.optim)),
            learning_rate=self.learning_rate,
            num_train_epochs=self.num_train_epochs,
            per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            seed=self.seed,
        )
        return values

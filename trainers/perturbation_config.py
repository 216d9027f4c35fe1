"""Settings shared by every SAM-family trainer (SAM, ASAM, Agnostic-SAM, and later FHBI and PGA)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from hf_extensions.documentation import document_fields
from hf_extensions.perturbation import PERTURBATION_NORMS
from hf_extensions.validation import check_bool, check_choice, check_integer, check_range
from trainers.method_config import MethodConfig


@document_fields
@dataclass
class PerturbationConfig(MethodConfig):
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

    #: The SAM-family knobs every subclass records in its model card after its own fields.
    shared_fields: ClassVar[tuple[str, ...]] = (
        "adaptive",
        "adaptive_eta",
        "perturb_norm",
        "freeze_batchnorm_stats",
        "sharpness_batch_size",
    )

    def __post_init__(self):
        super().__post_init__()
        self.adaptive = check_bool("adaptive", self.adaptive)
        self.adaptive_eta = check_range("adaptive_eta", self.adaptive_eta, low=0.0)
        self.perturb_norm = check_choice("perturb_norm", self.perturb_norm, PERTURBATION_NORMS)
        self.freeze_batchnorm_stats = check_bool(
            "freeze_batchnorm_stats", self.freeze_batchnorm_stats
        )
        if self.sharpness_batch_size is not None:
            self.sharpness_batch_size = check_integer(
                "sharpness_batch_size", self.sharpness_batch_size, low=1
            )

    def method_hyperparameters(self) -> dict[str, Any]:
        values = super().method_hyperparameters()
        return {**{name: getattr(self, name) for name in self.shared_fields}, **values}

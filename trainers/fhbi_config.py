"""Configuration of :class:`trainers.FHBITrainer` (FHBI, its SVGD and deep-ensemble baselines)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hf_extensions.documentation import document_fields
from hf_extensions.fhbi.kernels import KERNEL_GRAD_SIGNS, KERNEL_SCOPES
from hf_extensions.validation import check_choice, check_integer, check_range, refuse
from trainers.perturbation_config import PerturbationConfig

KERNELS = ("rbf", "none")
ASCENT_NORMS = ("block", "particle")
LIKELIHOODS = ("per_particle", "ensemble_logits")
#: ``"particle"``: each particle's likelihood gradient at the scale of one model's mean
#: cross-entropy (Σ_i CE_i; m · CE of the mean logits). ``"official_code"``: the loss divided by m
#: (mean_i CE_i; CE of the mean logits as the official code writes it), so the likelihood is m
#: times weaker against the kernel's repulsion and the prior.
LIKELIHOOD_SCALES = ("particle", "official_code")


@document_fields
@dataclass
class FHBIConfig(PerturbationConfig):
    """``TrainingArguments`` for Flat Hilbert Bayesian Inference over a particle ensemble.

    Truong, Tran, Pham-Ngoc, Ho, Phung, Le, "Improving Generalization with Flat Hilbert Bayesian
    Inference", ICML 2025 (arXiv 2410.04196), Algorithm 1. Baselines are settings of the same
    method: ``rho=0`` is SVGD (Liu & Wang 2016); ``kernel="none"`` is a deep ensemble (K = I, no
    repulsion; with ``rho > 0`` an ensemble of SAM models); ``num_particles=1`` is SAM.

    The model trained is a :class:`hf_extensions.fhbi.particles.ParticleEnsemble` of
    ``num_particles`` particles. ``perturb_norm`` of the SAM family is replaced by
    ``ascent_norm`` (the radius is per particle here) and must stay ``"global"``.

    Example::

        ensemble = ParticleEnsemble(get_peft_model(vit, LoraConfig(...)), num_particles=4)
        args = FHBIConfig(output_dir="out", rho=0.03, learning_rate=0.15, optim="sgd")
        FHBITrainer(model=ensemble, args=args, train_dataset=train).train()
    """

    num_particles: int = field(default=4, metadata={"help": "m, the number of particles."})
    rho: float = field(
        default=0.03,
        metadata={"help": "Radius of each particle's ascent step (0: SVGD). Paper code: 0.03."},
    )
    kernel: str = field(
        default="rbf",
        metadata={
            "help": "'rbf' (SVGD/FHBI interaction) or 'none' (K = I, no repulsion: an ensemble).",
            "choices": KERNELS,
        },
    )
    kernel_bandwidth: float | None = field(
        default=None,
        metadata={
            "help": "sigma of K = exp(-d^2 / (2 sigma^2)); empty: median heuristic "
            "sigma^2 = med(d^2) / (2 log(m + 1))."
        },
    )
    kernel_scope: str = field(
        default="global",
        metadata={
            "help": "'global': one kernel over the whole particle (paper); 'block': one kernel "
            "per parameter tensor (official code; with zero-initialised LoRA B tensors the median "
            "bandwidth of those blocks collapses and their repulsion explodes).",
            "choices": KERNEL_SCOPES,
        },
    )
    kernel_grad_sign: str = field(
        default="paper",
        metadata={
            "help": "'paper': repulsive kernel-gradient term. 'official_code': the official "
            "code's sign and factor 2, which attracts particles (reproduction only).",
            "choices": KERNEL_GRAD_SIGNS,
        },
    )
    ascent_norm: str = field(
        default="block",
        metadata={
            "help": "Normalisation of the ascent step: 'block' (every tensor of a particle gets "
            "radius rho, as the official code) or 'particle' (one radius per particle).",
            "choices": ASCENT_NORMS,
        },
    )
    likelihood: str = field(
        default="per_particle",
        metadata={
            "help": "'per_particle': each particle's own cross-entropy (paper); "
            "'ensemble_logits': cross-entropy of the particles' mean logits (official code).",
            "choices": LIKELIHOODS,
        },
    )
    likelihood_scale: str = field(
        default="particle",
        metadata={
            "help": "Weight of the likelihood against the kernel and prior terms. 'particle': "
            "each particle's gradient at the scale of one model's mean cross-entropy (sum over "
            "particles; m x CE of the mean logits). 'official_code': the loss divided by m (CE "
            "of the mean logits exactly as the official code), i.e. m times weaker.",
            "choices": LIKELIHOOD_SCALES,
        },
    )
    prior_std: float | None = field(
        default=None,
        metadata={
            "help": "Std of a Gaussian prior on the particle tensors, added to the loss as "
            "||theta||^2 / (2 prior_std^2 N), N the training-set size. Empty: flat prior."
        },
    )

    method_fields: ClassVar[tuple[str, ...]] = (
        "num_particles",
        "rho",
        "kernel",
        "kernel_bandwidth",
        "kernel_scope",
        "kernel_grad_sign",
        "ascent_norm",
        "likelihood",
        "likelihood_scale",
        "prior_std",
    )

    def __post_init__(self):
        super().__post_init__()
        self.num_particles = check_integer("num_particles", self.num_particles, low=1)
        self.rho = check_range("rho", self.rho, low=0.0)
        self.kernel = check_choice("kernel", self.kernel, KERNELS)
        self.kernel_scope = check_choice("kernel_scope", self.kernel_scope, KERNEL_SCOPES)
        self.kernel_grad_sign = check_choice(
            "kernel_grad_sign", self.kernel_grad_sign, KERNEL_GRAD_SIGNS
        )
        self.ascent_norm = check_choice("ascent_norm", self.ascent_norm, ASCENT_NORMS)
        self.likelihood = check_choice("likelihood", self.likelihood, LIKELIHOODS)
        self.likelihood_scale = check_choice(
            "likelihood_scale", self.likelihood_scale, LIKELIHOOD_SCALES
        )
        for name in ("kernel_bandwidth", "prior_std"):  # None: median heuristic / flat prior
            if getattr(self, name) is not None:
                value = check_range(name, getattr(self, name), low=0.0, low_open=True)
                setattr(self, name, value)
        check_choice("perturb_norm", self.perturb_norm, ("global",))
        if self.fp16:
            refuse(
                "fp16",
                "False for FHBITrainer (the kernel step rewrites gradients that the GradScaler may "
                "not have unscaled yet; use `bf16`)",
                self.fp16,
            )

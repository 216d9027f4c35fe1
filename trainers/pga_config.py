"""Configuration of PGA (prompt gradient alignment for unsupervised domain adaptation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hf_extensions.documentation import document_fields
from hf_extensions.validation import check_bool, check_integer, check_range, check_text, refuse
from trainers.method_config import MethodConfig


@document_fields
@dataclass
class PGAConfig(MethodConfig):
    """``TrainingArguments`` plus the settings of PGA (Phan et al., NeurIPS 2024, arXiv 2406.09353).

    ``pga_rho`` is the gradient-norm penalty radius ρ, ``pga_align`` the gradient-alignment weight
    α and ``pga_tradeoff`` the source weight λ of the update in :class:`trainers.PGATrainer`
    (Sec. 4, Algorithm 1). Baselines are configurations: ``pga_rho = pga_align = 0`` is ERM on
    source + pseudo-labelled target prompts (two passes per step), ``pga_source_only`` is
    source-only prompt tuning. The learning rate defaults to the paper's 3e-3 (AdamW).
    """

    method_fields: ClassVar[tuple[str, ...]] = (
        "pga_rho",
        "pga_align",
        "pga_tradeoff",
        "pseudo_label_threshold",
        "n_ctx_shared",
        "n_ctx_domain",
        "class_specific_shared",
        "multi_source",
        "target_domain",
        "pga_source_only",
        "cache_image_features",
    )

    pga_rho: float = field(
        default=1e-3,
        metadata={
            "help": "Gradient-norm penalty radius rho (the paper: 3e-4 to 1e-3); >= 0. Each "
            "prompt tensor is shifted by rho (logged relative to ||theta_sh||: `rho_shift_rel`)."
        },
    )
    pga_align: float = field(
        default=1.0,
        metadata={
            "help": "Gradient-alignment weight alpha (the paper: 1 or 10); >= 0. It shifts the "
            "shared prompt by alpha / ||g^sh||, which grows as the gradients shrink: keep it a "
            "small fraction of ||theta_sh|| (the trainer logs `align_shift_rel`)."
        },
    )
    pga_tradeoff: float = field(
        default=1.0,
        metadata={"help": "Weight lambda of the source gradients on the shared prompt; > 0."},
    )
    pseudo_label_threshold: float = field(
        default=0.4,
        metadata={"help": "Zero-shot confidence needed to keep a target pseudo-label, in [0, 1]."},
    )
    n_ctx_shared: int = field(
        default=16, metadata={"help": "Length of the shared (domain-agnostic) context; >= 1."}
    )
    n_ctx_domain: int = field(
        default=16, metadata={"help": "Length of each domain's context; >= 1."}
    )
    class_specific_shared: bool = field(
        default=True, metadata={"help": "One shared context per class (the paper) or one for all."}
    )
    multi_source: bool = field(
        default=False,
        metadata={"help": "Allow several source domains (the multi-source variant)."},
    )
    target_domain: str = field(
        default="target", metadata={"help": "Name of the target domain in the paired batches."}
    )
    pga_source_only: bool = field(
        default=False,
        metadata={"help": "Baseline: tune the prompts on the source domain(s) only."},
    )
    cache_image_features: bool = field(
        default=True,
        metadata={
            "help": "Encode each batch's images once per step and reuse them in every pass "
            "(False: re-encode in every pass, as the official code does)."
        },
    )
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the paired batches are nested per domain."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.pga_rho = check_range("pga_rho", self.pga_rho, low=0.0)
        self.pga_align = check_range("pga_align", self.pga_align, low=0.0)
        self.pga_tradeoff = check_range("pga_tradeoff", self.pga_tradeoff, low=0.0, low_open=True)
        self.pseudo_label_threshold = check_range(
            "pseudo_label_threshold", self.pseudo_label_threshold, low=0.0, high=1.0
        )
        self.n_ctx_shared = check_integer("n_ctx_shared", self.n_ctx_shared, low=1)
        self.n_ctx_domain = check_integer("n_ctx_domain", self.n_ctx_domain, low=1)
        for name in (
            "class_specific_shared",
            "multi_source",
            "pga_source_only",
            "cache_image_features",
            "remove_unused_columns",
        ):
            setattr(self, name, check_bool(name, getattr(self, name)))
        self.target_domain = check_text("target_domain", self.target_domain, "a domain name")
        if self.pga_source_only and self.pga_align != 0:
            refuse(
                "pga_align",
                "0 with `pga_source_only=True` (there is no target gradient to align with)",
                self.pga_align,
            )
        if self.remove_unused_columns:
            refuse(
                "remove_unused_columns",
                "False for PGA (batches hold one nested dict per domain, which column removal "
                "would drop)",
                self.remove_unused_columns,
            )

"""Configuration of :class:`trainers.PromptDSITrainer` (PromptDSI and its trained baselines)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hf_extensions.documentation import document_fields
from hf_extensions.validation import check_bool, check_choice, check_range, refuse
from trainers.method_config import MethodConfig

#: How an increment of documents is learned.
STRATEGIES = ("prompt_dsi", "l2p", "sequential", "joint")
#: Strategies that learn through a prompt pool around a frozen encoder.
POOL_STRATEGIES = ("prompt_dsi", "l2p")


@document_fields
@dataclass
class PromptDSIConfig(MethodConfig):
    """``TrainingArguments`` for incremental indexing of a classification DSI.

    PromptDSI: Huynh et al., "PromptDSI: Prompt-based Rehearsal-free Instance-wise Incremental
    Learning for Document Retrieval" (arXiv 2406.12593). Each increment trains, with the
    cross-entropy from the new documents' texts and pseudo-queries to their docids (the DSI
    indexing + retrieval objective), only what ``strategy`` allows:

    - ``prompt_dsi``: the prompts of a pool (``get_peft_model(encoder, PromptPoolConfig(
      key_source="fixed", query_source="input_embed_mean"))``: topic keys, one encoder pass)
      and the new docid rows; encoder and old rows frozen; rehearsal-free.
    - ``l2p``: the same with an L2P pool (learned keys, ``frozen_cls`` query = an extra frozen
      pass, pull loss added through the pool's ``auxiliary_loss``).
    - ``sequential``: fine-tunes encoder and every row on the new documents only (forgets).
    - ``joint``: fine-tunes encoder and every row on every document seen so far (the upper
      bound; with one increment = D0 it is the initial DSI training).

    Paper defaults: AdamW, learning rate 1e-3, 10 epochs per increment, batch 128.
    """

    strategy: str = field(
        default="prompt_dsi", metadata={"help": f"How increments are learned: one of {STRATEGIES}."}
    )
    train_encoder: bool | None = field(
        default=None,
        metadata={
            "help": "Fine-tune the encoder's weights (default: yes for sequential/joint, no for "
            "the pool strategies, which refuse it)."
        },
    )
    train_old_rows: bool | None = field(
        default=None,
        metadata={
            "help": "Train the docid rows of earlier increments too (default: yes for "
            "sequential/joint, no for the pool strategies)."
        },
    )
    auxiliary_loss_weight: float = field(
        default=1.0,
        metadata={
            "help": "Factor on the pool's auxiliary (L2P pull) loss; the pool's own "
            "pull_loss_weight already scales it, so 1.0 adds it as the pool defines it."
        },
    )
    rows_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the docid rows (default: learning_rate). Lets a fine-tuned "
            "encoder (~5e-5) and fresh rows (~1e-2) train in one run."
        },
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (paper)."})
    num_train_epochs: float = field(default=10.0, metadata={"help": "Epochs per increment."})

    method_fields: ClassVar[tuple[str, ...]] = (
        "strategy",
        "train_encoder",
        "train_old_rows",
        "auxiliary_loss_weight",
        "rows_learning_rate",
    )

    def __post_init__(self):
        super().__post_init__()
        self.strategy = check_choice("strategy", self.strategy, STRATEGIES)
        self.train_encoder = check_bool("train_encoder", self.train_encoder, optional=True)
        self.train_old_rows = check_bool("train_old_rows", self.train_old_rows, optional=True)
        pool = self.strategy in POOL_STRATEGIES
        if self.train_encoder is None:
            self.train_encoder = not pool
        if self.train_old_rows is None:
            self.train_old_rows = not pool
        if pool and self.train_encoder:
            refuse(
                "train_encoder",
                f"False with `strategy`={self.strategy!r} (the pool strategies keep the encoder "
                "frozen, rehearsal-free; use 'sequential' or 'joint')",
                self.train_encoder,
            )
        self.auxiliary_loss_weight = check_range(
            "auxiliary_loss_weight", self.auxiliary_loss_weight, low=0.0
        )
        if self.rows_learning_rate is not None:
            self.rows_learning_rate = check_range(
                "rows_learning_rate", self.rows_learning_rate, low=0.0, low_open=True
            )

    @property
    def uses_pool(self) -> bool:
        return self.strategy in POOL_STRATEGIES

"""What a conformance case is, and the helpers its hooks share.

A :class:`Case` describes one method through hooks; ``tests/test_conformance.py`` runs the same
five checks over every case. A hook that does not apply is ``None`` and the case says why in
``not_applicable`` (a test checks that every property is either implemented or explained).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

Tensors = dict[str, torch.Tensor]

#: The five properties, by the names used in ``Case.not_applicable`` and in test ids.
PROPERTIES = ("baseline", "reload", "card", "bad_config", "two_processes")

#: TrainingArguments every trainer case shares: CPU, seeded, nothing written or logged.
QUIET = dict(
    report_to=[],
    use_cpu=True,
    save_strategy="no",
    logging_strategy="no",
    disable_tqdm=True,
    seed=0,
    dataloader_pin_memory=False,
)
#: A real optimisation set-up (AdamW, weight decay, clipping, a linear schedule, shuffled
#: batches): the baseline comparisons run through all of it.
REAL_STEP = dict(
    optim="adamw_torch",
    learning_rate=1e-2,
    weight_decay=0.01,
    max_grad_norm=1.0,
    lr_scheduler_type="linear",
    per_device_train_batch_size=8,
    max_steps=3,
)
#: Plain SGD for the data-parallel runs: the all-reduce adds gradients in another order than one
#: process (a rounding difference of ~1e-8), which SGD keeps at that size and Adam does not.
DDP_STEP = dict(
    optim="sgd",
    learning_rate=0.5,
    weight_decay=0.0,
    max_grad_norm=0.0,
    lr_scheduler_type="constant",
    max_steps=3,
)
#: The keywords the trainer cases build their refused configs from (nothing runs with them).
TRAINING = dict(output_dir="unused", report_to=[])
#: The prompt of the diffusion cases: the concept the erasure case erases, and what the S2N
#: case's pipeline generates.
CONCEPT = "a red circle"


@dataclass
class Baseline:
    """Outputs of the method at its baseline setting, of the stock reference, and of a control.

    ``method`` must equal ``stock`` bit for bit. ``control`` (the method at a non-baseline
    setting) must differ from ``stock`` somewhere, so that the equality is not one any setting
    would pass. ``initial`` (optional) is where ``stock`` started: it must have moved from it
    by more than ``min_change`` (the equality is not about untrained weights).
    """

    method: Tensors
    stock: Tensors
    control: Tensors
    initial: Tensors | None = None
    min_change: float = 1e-3


@dataclass(frozen=True)
class CardSpec:
    """What the saved artifact's model card must say.

    ``settings`` are non-default values the case's ``save`` hook puts into ``config_cls``; the
    card must record each exactly (a card that records defaults, or drops a field, fails).
    """

    method: str
    paper: str
    arxiv_id: str
    library_name: str
    config_cls: type
    settings: Mapping[str, Any]


@dataclass(frozen=True)
class BadConfig:
    """A config that must be refused with a ``ValueError`` whose message starts with ``field``."""

    field: str
    build: Callable[[], Any]
    label: str


@dataclass(frozen=True)
class Saved:
    """What a ``save`` hook returns: outputs computed in the saving process, and the config
    values the card must match (``None`` where the case has no card)."""

    outputs: Tensors
    recorded: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Ranks:
    """A data-parallel check: ``run(output_dir, variant)`` trains on this process and returns
    ``(values, initial, final)`` (``values["steps"]``: the steps taken).

    Variant ``"two"`` runs on 2 processes and ``"one"`` on 1 at the same global batch: every
    rank of ``"two"`` ends with the same tensors, and they equal ``"one"``'s within ``rtol`` /
    ``atol`` (or as ``compare(two_reports, one_report)`` asserts). With ``has_control``,
    ``"control"`` (1 process, another batch split) must end elsewhere than ``"one"``. With
    ``has_replicas``, ``"replicas"`` (2 processes, the full method, whose per-process terms make
    it differ from one process) must still end with the same tensors on every rank.
    """

    run: Callable[[str, str], tuple[dict, Tensors, Tensors]]
    has_control: bool = False
    has_replicas: bool = False
    rtol: float = 1e-5
    atol: float = 1e-6
    compare: Callable[[list, Any], None] | None = None


@dataclass(frozen=True)
class Case:
    """One method of the suite: its hooks, and why any property does not apply."""

    id: str
    baseline: Callable[[Path], Baseline] | None = None
    save: Callable[[Path], Saved] | None = None
    reload: Callable[[Path], Tensors] | None = None
    card: CardSpec | None = None
    bad_configs: tuple[BadConfig, ...] = ()
    field_message: str = "^`{field}`"
    ranks: Ranks | None = None
    not_applicable: Mapping[str, str] = field(default_factory=dict)

    def implements(self, prop: str) -> bool:
        """Whether the case has the hooks of property ``prop``."""
        return {
            "baseline": self.baseline is not None,
            "reload": self.save is not None and self.reload is not None,
            "card": self.card is not None and self.save is not None,
            "bad_config": bool(self.bad_configs),
            "two_processes": self.ranks is not None,
        }[prop]


def bad(field_name: str, build: Callable[[], Any], value: Any) -> BadConfig:
    """A :class:`BadConfig` labelled ``field=value`` (the label is part of the test id)."""
    shown = "nan" if isinstance(value, float) and math.isnan(value) else repr(value)
    return BadConfig(field_name, build, f"{field_name}={shown}")


def bad_values(config_cls: type, base: Mapping[str, Any], pairs) -> tuple[BadConfig, ...]:
    """One :class:`BadConfig` per ``(field, value)``: ``config_cls(**base, field=value)``."""
    return tuple(
        bad(name, lambda name=name, value=value: config_cls(**{**base, name: value}), value)
        for name, value in pairs
    )


def field_default(config_cls: type, name: str) -> Any:
    """The dataclass default of ``config_cls.name``."""
    for item in dataclasses.fields(config_cls):
        if item.name == name:
            if item.default is not dataclasses.MISSING:
                return item.default
            if item.default_factory is not dataclasses.MISSING:
                return item.default_factory()
    raise KeyError(f"{config_cls.__name__} has no field {name!r}")


def params(module: torch.nn.Module, trainable_only: bool = True) -> Tensors:
    """Detached copies of ``module``'s (trainable) parameters, by name."""
    return {
        name: p.detach().clone()
        for name, p in module.named_parameters()
        if p.requires_grad or not trainable_only
    }


def prefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> Tensors:
    """``tensors`` with ``prefix/`` before every name."""
    return {f"{prefix}/{name}": value for name, value in tensors.items()}


def digits(kind: str, rows: int):
    """The first ``rows`` training digits: ``features`` (64-vectors) or 8x8 ``pixel_values``."""
    from hf_extensions.data import load_digits  # not needed by the reload process

    if kind == "vector":
        split = load_digits(seed=0, layout="vector")["train"]
        return split.select(range(rows)).select_columns(["features", "labels"])
    split = load_digits(seed=0)["train"]
    return split.select(range(rows)).select_columns(["pixel_values", "labels"])


def probe_pixels(rows: int = 6, channels: int = 1, size: int = 8) -> torch.Tensor:
    """Fixed inputs for comparing outputs of a saved and a reloaded image model."""
    return torch.rand(rows, channels, size, size, generator=torch.Generator().manual_seed(11))


def fit(trainer) -> None:
    """Train, then leave the model in eval mode (the outputs compared are inference outputs)."""
    trainer.train()
    trainer.accelerator.unwrap_model(trainer.model).eval()


def saved_trainer(trainer, directory: Path, outputs) -> Saved:
    """Save ``trainer``'s model and card into ``directory`` (its ``output_dir``)."""
    trainer.save_model(str(directory))
    trainer.create_model_card()
    config = trainer.args
    return Saved(outputs, {name: getattr(config, name) for name in config.method_fields})


def stock_ranks(build):
    """The stock ``Trainer`` on a PEFT model of ``build()`` (digits, 10 labels): 2 x 8 == 1 x 16."""

    def run(output_dir: str, variant: str):
        model = build()
        initial = params(model)
        args = TrainingArguments(
            output_dir,
            per_device_train_batch_size={"two": 8, "one": 16}[variant],
            **{**QUIET, **DDP_STEP},
        )
        trainer = Trainer(model=model, args=args, train_dataset=digits("image", 48))
        trainer.train()
        return {"steps": trainer.state.global_step}, initial, params(model)

    return Ranks(run)

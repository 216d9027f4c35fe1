"""Conformance cases of SAM, ASAM and Agnostic-SAM (``SAMTrainer``, ``SAMTrainer`` with
``adaptive=True``, ``AgnosticSAMTrainer``), and the perturbation helpers the three share.
Baseline: ρ = 0 (``rho_train = rho_val = 0`` for Agnostic-SAM) equals the stock ``Trainer``
bit for bit on an MLP (per-batch mean loss) and a ViT (loss normalised by
``num_items_in_batch``), through AdamW, weight decay, clipping and a linear schedule; the
control is ρ > 0. Reload: a ViT by ``from_pretrained``; two processes: 2 x 16 = 1 x 32 in
sharpness batches of 16, the whole-batch control differs."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, ViTForImageClassification

from conformance.case import (
    DDP_STEP,
    QUIET,
    REAL_STEP,
    TRAINING,
    Baseline,
    CardSpec,
    Case,
    Ranks,
    Saved,
    bad_values,
    digits,
    fit,
    params,
    prefixed,
    probe_pixels,
    saved_trainer,
)
from hf_extensions.models import tiny_mlp_classifier
from hf_extensions.models import tiny_vit_classifier as vit
from trainers import AgnosticSAMConfig, AgnosticSAMTrainer, SAMConfig, SAMTrainer

_MODELS = {"vector": lambda: tiny_mlp_classifier(), "image": lambda: vit()}


def _train_perturbation(trainer_cls, config_cls, kind, output_dir, **settings):
    model = _MODELS[kind]().train()
    args = config_cls(output_dir=str(output_dir), **{**QUIET, **REAL_STEP, **settings})
    trainer_cls(model=model, args=args, train_dataset=digits(kind, 32)).train()
    return params(model)


@functools.cache
def _stock_perturbation_run(kind: str):
    """The stock ``Trainer`` run every SAM-family case compares with (computed once)."""
    with tempfile.TemporaryDirectory() as output_dir:
        return _train_perturbation(Trainer, TrainingArguments, kind, output_dir)


def _perturbation_baseline(trainer_cls, config_cls, zero, control):
    """ρ = 0 against the stock ``Trainer`` on an MLP (per-batch mean loss) and a ViT (loss
    normalised by ``num_items_in_batch``): the two loss conventions of ``Trainer``."""

    def baseline(tmp_path: Path) -> Baseline:
        result = Baseline({}, {}, {}, {})
        for kind in _MODELS:
            result.stock.update(prefixed(kind, _stock_perturbation_run(kind)))
            for name, settings in (("method", zero), ("control", control)):
                output_dir = tmp_path / f"{kind}-{name}"
                trained = _train_perturbation(trainer_cls, config_cls, kind, output_dir, **settings)
                getattr(result, name).update(prefixed(kind, trained))
            result.initial.update(prefixed(kind, params(_MODELS[kind]())))
        return result

    return baseline


def _perturbation_save(trainer_cls, config_cls, settings):
    """A tiny ViT (SDPA, what ``from_pretrained`` picks) trained 2 steps and saved."""

    def save(directory: Path) -> Saved:
        model = vit(attn_implementation="sdpa").train()
        args = config_cls(
            output_dir=str(directory), **{**QUIET, **REAL_STEP, "max_steps": 2, **settings}
        )
        trainer = trainer_cls(model=model, args=args, train_dataset=digits("image", 32))
        fit(trainer)
        with torch.no_grad():
            logits = model(pixel_values=probe_pixels()).logits
        return saved_trainer(trainer, directory, {"logits": logits})

    return save


def _reload_vit(directory: Path):
    model = ViTForImageClassification.from_pretrained(directory).eval()
    with torch.no_grad():
        return {"logits": model(pixel_values=probe_pixels()).logits}


def _perturbation_ranks(trainer_cls, config_cls, settings):
    """2 x 16 rows == 1 x 32 rows perturbed in sharpness batches of 16 (each process perturbs by
    its own gradient); the control perturbs by the whole 32 rows (the ascent pass does not
    all-reduce, so it differs)."""

    def run(output_dir: str, variant: str):
        batch = {"two": 16, "one": 32, "control": 32}[variant]
        sharpness = {"one": 16}.get(variant)
        model = vit().train()
        initial = params(model)
        args = config_cls(
            output_dir=output_dir,
            per_device_train_batch_size=batch,
            sharpness_batch_size=sharpness,
            **{**QUIET, **DDP_STEP, **settings},
        )
        trainer = trainer_cls(model=model, args=args, train_dataset=digits("image", 96))
        trainer.train()
        return {"steps": trainer.state.global_step}, initial, params(model)

    return Ranks(run, has_control=True)


_SAM_BASE = dict(TRAINING)
_SAM_BAD = [
    ("rho", -0.1),
    ("rho", float("nan")),
    ("perturb_norm", "l2"),
    ("adaptive_eta", -1.0),
    ("sharpness_batch_size", 0),
]
SAM_CARD = {"rho": 0.07, "perturb_norm": "per_tensor", "sharpness_batch_size": 4}
ASAM_CARD = {"rho": 0.7, "adaptive": True, "adaptive_eta": 0.02}

SAM = Case(
    id="sam",
    baseline=_perturbation_baseline(SAMTrainer, SAMConfig, {"rho": 0.0}, {"rho": 0.05}),
    save=_perturbation_save(SAMTrainer, SAMConfig, SAM_CARD),
    reload=_reload_vit,
    card=CardSpec(
        "sam",
        "Sharpness-Aware Minimization for Efficiently Improving Generalization",
        "2010.01412",
        "transformers",
        SAMConfig,
        SAM_CARD,
    ),
    bad_configs=bad_values(SAMConfig, _SAM_BASE, _SAM_BAD),
    ranks=_perturbation_ranks(SAMTrainer, SAMConfig, {"rho": 0.05}),
)

ASAM = Case(
    id="asam",
    baseline=_perturbation_baseline(
        SAMTrainer, SAMConfig, {"rho": 0.0, "adaptive": True}, {"rho": 0.5, "adaptive": True}
    ),
    save=_perturbation_save(SAMTrainer, SAMConfig, ASAM_CARD),
    reload=_reload_vit,
    card=CardSpec(
        "asam",
        "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of Deep "
        "Neural Networks",
        "2102.11600",
        "transformers",
        SAMConfig,
        ASAM_CARD,
    ),
    bad_configs=bad_values(SAMConfig, {**_SAM_BASE, "adaptive": True}, [("adaptive_eta", -0.5)]),
    ranks=_perturbation_ranks(SAMTrainer, SAMConfig, {"rho": 0.5, "adaptive": True}),
)

AGNOSTIC_CARD = {"rho_train": 0.07, "rho_val": 0.03, "val_fraction": 0.25, "chain": True}
AGNOSTIC_SAM = Case(
    id="agnostic-sam",
    baseline=_perturbation_baseline(
        AgnosticSAMTrainer,
        AgnosticSAMConfig,
        {"rho_train": 0.0, "rho_val": 0.0},
        {"rho_train": 0.05, "rho_val": 0.05},
    ),
    save=_perturbation_save(
        AgnosticSAMTrainer, AgnosticSAMConfig, {**AGNOSTIC_CARD, "final_grad_on": "sum"}
    ),
    reload=_reload_vit,
    card=CardSpec(
        "agnostic-sam",
        "Agnostic Sharpness-Aware Minimization",
        "2406.07107",
        "transformers",
        AgnosticSAMConfig,
        {**AGNOSTIC_CARD, "final_grad_on": "sum"},
    ),
    bad_configs=bad_values(
        AgnosticSAMConfig,
        TRAINING,
        [
            ("rho_train", -0.05),
            ("rho_train", float("inf")),
            ("rho_val", -0.05),
            ("val_fraction", 0.0),
            ("val_fraction", 1.0),
            ("final_grad_on", "validation"),
        ],
    ),
    ranks=_perturbation_ranks(
        AgnosticSAMTrainer, AgnosticSAMConfig, {"rho_train": 0.05, "rho_val": 0.05}
    ),
)

"""Conformance case of PGA (Prompt Gradient Alignment: ``PGATrainer`` on a CLIP prompt learner
over paired source and target domains). Baseline: ρ = α = 0 with trade-off 1 is ERM and
equals the stock ``Trainer`` on L_target + L_source; the control has ρ, α > 0. Reload: the
learner's state dict; two processes: ERM, and PGA's replicas agree."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainingArguments

from conformance.case import (
    QUIET,
    REAL_STEP,
    TRAINING,
    Baseline,
    CardSpec,
    Case,
    Ranks,
    Saved,
    bad,
    bad_values,
    fit,
    params,
    probe_pixels,
    saved_trainer,
)
from hf_extensions.models import tiny_clip
from hf_extensions.pga.clip_prompts import CLIPPromptLearner
from trainers import PGAConfig, PGATrainer
from trainers.pga_trainer import PairedDomainCollator, PairedDomainDataset

_PGA_CLASSES = ["zero", "one", "two"]


def _pga_learner() -> CLIPPromptLearner:
    clip, tokenizer = tiny_clip()
    torch.manual_seed(0)
    return CLIPPromptLearner(
        clip, tokenizer, _PGA_CLASSES, ["source", "target"], n_ctx_shared=2, n_ctx_domain=2
    )


def _pga_data(rows: int = 24, unlabelled: bool = True) -> PairedDomainDataset:
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(rows) % 3
    target_labels = labels.clone()
    if unlabelled:
        target_labels[::4] = -100  # unconfident pseudo-labels
    return PairedDomainDataset(
        {
            "source": {
                "pixel_values": torch.rand(rows, 3, 16, 16, generator=generator),
                "labels": labels,
            },
            "target": {
                "pixel_values": torch.rand(rows // 2, 3, 16, 16, generator=generator),
                "labels": target_labels[: rows // 2],
            },
        },
        seed=0,
    )


class _ERMObjective(nn.Module):
    """The stock objective of ERM over prompts: target loss + source loss."""

    def __init__(self, learner: CLIPPromptLearner):
        super().__init__()
        self.learner = learner

    def forward(self, source, target):
        learner = self.learner
        total = 0
        for name, batch in (("target", target), ("source", source)):
            features = learner.image_features(batch["pixel_values"])
            total = total + learner.domain_loss(features, batch["labels"], name)
        return {"loss": total}


_PGA_SHAPE = dict(n_ctx_shared=2, n_ctx_domain=2, remove_unused_columns=False)


def _pga_baseline(tmp_path: Path) -> Baseline:
    """ρ = α = 0 with trade-off 1 is ERM: the stock ``Trainer`` on L_target + L_source."""
    stock = _pga_learner()
    args = TrainingArguments(
        str(tmp_path / "stock"), remove_unused_columns=False, **QUIET, **REAL_STEP
    )
    Trainer(
        model=_ERMObjective(stock),
        args=args,
        train_dataset=_pga_data(),
        data_collator=PairedDomainCollator(),
    ).train()
    result = Baseline({}, params(stock), {}, params(_pga_learner()))
    for name, rho, align in (("method", 0.0, 0.0), ("control", 1e-2, 1.0)):
        learner = _pga_learner()
        config = PGAConfig(
            output_dir=str(tmp_path / name),
            pga_rho=rho,
            pga_align=align,
            pga_tradeoff=1.0,
            **_PGA_SHAPE,
            **QUIET,
            **REAL_STEP,
        )
        PGATrainer(model=learner, args=config, train_dataset=_pga_data()).train()
        setattr(result, name, params(learner))
    return result


PGA_CARD = {
    "pga_rho": 2e-3,
    "pga_align": 0.5,
    "pga_tradeoff": 0.5,
    "pseudo_label_threshold": 0.6,
    "n_ctx_shared": 2,
    "n_ctx_domain": 2,
}


def _pga_outputs(learner: CLIPPromptLearner):
    with torch.no_grad():
        return {"logits": learner.eval()(pixel_values=probe_pixels(4, 3, 16))["logits"]}


def _pga_save(directory: Path) -> Saved:
    learner = _pga_learner()
    config = PGAConfig(
        output_dir=str(directory),
        remove_unused_columns=False,
        **{**QUIET, **REAL_STEP, "max_steps": 2, **PGA_CARD},
    )
    trainer = PGATrainer(model=learner, args=config, train_dataset=_pga_data())
    fit(trainer)
    return saved_trainer(trainer, directory, _pga_outputs(learner))


def _pga_reload(directory: Path):
    learner = _pga_learner()
    learner.load_state_dict(load_file(directory / "model.safetensors"))
    return _pga_outputs(learner)


def _pga_ranks(output_dir: str, variant: str):
    """ERM (ρ = α = 0): 2 x 8 == 1 x 16 (the prompt gradients are all-reduced explicitly).
    ``replicas``: PGA (ρ, α > 0; the shifts are per process, as SAM's): the ranks agree."""
    learner = _pga_learner()
    initial = params(learner)
    pga = variant == "replicas"
    config = PGAConfig(
        output_dir=output_dir,
        pga_rho=0.01 if pga else 0.0,
        pga_align=1.0 if pga else 0.0,
        per_device_train_batch_size={"two": 8, "one": 16, "replicas": 8}[variant],
        **{**_PGA_SHAPE, **QUIET, "max_steps": 3},
    )
    trainer = PGATrainer(model=learner, args=config, train_dataset=_pga_data(64, False))
    trainer.train()
    return {"steps": trainer.state.global_step}, initial, params(learner)


PGA = Case(
    id="pga",
    baseline=_pga_baseline,
    save=_pga_save,
    reload=_pga_reload,
    card=CardSpec(
        "pga",
        "Enhancing Domain Adaptation through Prompt Gradient Alignment",
        "2406.09353",
        "transformers",
        PGAConfig,
        PGA_CARD,
    ),
    bad_configs=(
        *bad_values(
            PGAConfig,
            TRAINING,
            [
                ("pga_rho", -0.1),
                ("pga_align", -1.0),
                ("pga_tradeoff", 0.0),
                ("pseudo_label_threshold", 1.5),
                ("n_ctx_shared", 0),
                ("remove_unused_columns", True),
            ],
        ),
        bad(
            "pga_align",
            lambda: PGAConfig(**TRAINING, pga_source_only=True, pga_align=1.0),
            1.0,
        ),
    ),
    ranks=Ranks(_pga_ranks, has_replicas=True),
)

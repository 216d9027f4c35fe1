"""Conformance case of FHBI (Flat Hilbert Bayesian Inference: ``FHBITrainer`` over a
``ParticleEnsemble``). Baseline: one particle at ρ = 0 (SVGD with m = 1: K = 1, no
repulsion), evaluated by the reference ``loop`` mode, equals the stock ``Trainer`` on the model
itself, an MLP and a LoRA ViT (the paper's particles); the control is ρ = 0.05. Reload: 3 LoRA
particles; two processes: 3 particles in sharpness batches."""

from __future__ import annotations

from pathlib import Path

import torch
from fhbi_setup import lora_vit
from transformers import Trainer, TrainingArguments

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
from hf_extensions.fhbi.particles import ParticleEnsemble
from hf_extensions.models import tiny_mlp_classifier
from hf_extensions.models import tiny_vit_classifier as vit
from trainers import FHBIConfig, FHBITrainer


def _fhbi_baseline(tmp_path: Path) -> Baseline:
    """One particle at ρ = 0 (SVGD with m = 1: K = 1, no repulsion), evaluated by the
    reference ``loop`` mode, against the stock ``Trainer`` on the model itself: an MLP and a
    LoRA ViT (the paper's particles)."""
    builders = {"vector": tiny_mlp_classifier, "image": lora_vit}
    result = Baseline({}, {}, {}, {})
    for kind, build in builders.items():
        data = digits(kind, 32)
        stock = build().train()
        args = TrainingArguments(str(tmp_path / f"{kind}-stock"), **QUIET, **REAL_STEP)
        Trainer(model=stock, args=args, train_dataset=data).train()
        for name, rho in (("method", 0.0), ("control", 0.05)):
            ensemble = ParticleEnsemble(build(), num_particles=1, mode="loop").train()
            config = FHBIConfig(
                output_dir=str(tmp_path / f"{kind}-{name}"),
                num_particles=1,
                rho=rho,
                **QUIET,
                **REAL_STEP,
            )
            FHBITrainer(model=ensemble, args=config, train_dataset=data).train()
            particle = {
                n: p[0].detach().clone() for n, p in zip(ensemble.names, ensemble.particles)
            }
            getattr(result, name).update(prefixed(kind, particle))
        result.stock.update(prefixed(kind, {n: p for n, p in params(stock).items()}))
        result.initial.update(prefixed(kind, params(build())))
    return result


FHBI_CARD = {
    "num_particles": 3,
    "rho": 0.02,
    "kernel_scope": "block",
    "ascent_norm": "particle",
    "likelihood": "ensemble_logits",
    "prior_std": 1.0,
}


def _fhbi_save(directory: Path) -> Saved:
    ensemble = ParticleEnsemble(lora_vit(), num_particles=3).train()
    args = FHBIConfig(
        output_dir=str(directory), **{**QUIET, **REAL_STEP, "max_steps": 2, **FHBI_CARD}
    )
    trainer = FHBITrainer(model=ensemble, args=args, train_dataset=digits("image", 32))
    fit(trainer)
    return saved_trainer(trainer, directory, _particle_logits(ensemble))


def _particle_logits(ensemble: ParticleEnsemble):
    with torch.no_grad():
        out = ensemble(pixel_values=probe_pixels(), return_particle_logits=True)
    return {"particle_logits": out["particle_logits"], "logits": out["logits"]}


def _fhbi_reload(directory: Path):
    return _particle_logits(ParticleEnsemble.from_pretrained(vit(), directory).eval())


def _fhbi_ranks(output_dir: str, variant: str):
    """3 LoRA particles: 2 x 16 == 1 x 32 in sharpness batches of 16; control: perturbed by
    the whole 32 rows."""
    ensemble = ParticleEnsemble(lora_vit(), num_particles=3).train()
    initial = params(ensemble)
    args = FHBIConfig(
        output_dir=output_dir,
        num_particles=3,
        rho=0.05,
        per_device_train_batch_size={"two": 16, "one": 32, "control": 32}[variant],
        sharpness_batch_size=16 if variant == "one" else None,
        **{**QUIET, **DDP_STEP, "learning_rate": 0.1},
    )
    trainer = FHBITrainer(model=ensemble, args=args, train_dataset=digits("image", 96))
    trainer.train()
    return {"steps": trainer.state.global_step}, initial, params(ensemble)


FHBI = Case(
    id="fhbi",
    baseline=_fhbi_baseline,
    save=_fhbi_save,
    reload=_fhbi_reload,
    card=CardSpec(
        "fhbi",
        "Improving Generalization with Flat Hilbert Bayesian Inference",
        "2410.04196",
        "transformers",
        FHBIConfig,
        FHBI_CARD,
    ),
    bad_configs=bad_values(
        FHBIConfig,
        TRAINING,
        [
            ("kernel", "laplace"),
            ("kernel_scope", "layer"),
            ("likelihood", "joint"),
            ("ascent_norm", "tensor"),
            ("kernel_grad_sign", "minus"),
            ("rho", -0.1),
            ("num_particles", 0),
            ("kernel_bandwidth", 0.0),
            ("prior_std", float("nan")),
            ("perturb_norm", "per_tensor"),
        ],
    ),
    ranks=Ranks(_fhbi_ranks, has_control=True),
)

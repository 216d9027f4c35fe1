"""Models, batches and one-step trainers of :mod:`benchmarks.device_check`."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

from benchmarks.harness import quiet_training_arguments, trainer_step_fn
from hf_extensions.fhbi.particles import ParticleEnsemble
from hf_extensions.testing.mixed_precision import fp16_loss_scaling
from trainers import (
    AgnosticSAMConfig,
    AgnosticSAMTrainer,
    FHBIConfig,
    FHBITrainer,
    SAMConfig,
    SAMTrainer,
)

_counter = itertools.count()


@dataclass(frozen=True)
class Size:
    """A ViT classifier's size and the batch the check steps on."""

    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    batch_size: int
    num_labels: int = 10

    @classmethod
    def real(cls) -> Size:
        """ViT-B/16 at 224 px, 32 images."""
        return cls(224, 16, 768, 12, 12, 3072, batch_size=32)

    @classmethod
    def tiny(cls) -> Size:
        return cls(16, 4, 32, 2, 4, 64, batch_size=8)

    def vit(self) -> ViTForImageClassification:
        """A ViT of this size with weights drawn from seed 0 (the same model every call)."""
        config = ViTConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            num_labels=self.num_labels,
            attn_implementation="sdpa",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return ViTForImageClassification(config).train()

    def batch(self) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(1)
        shape = (self.batch_size, 3, self.image_size, self.image_size)
        return {
            "pixel_values": torch.rand(shape, generator=generator),
            "labels": torch.randint(0, self.num_labels, (self.batch_size,), generator=generator),
        }


@dataclass(frozen=True)
class Method:
    """How to build a method's model and trainer: ``settings`` are its real step's, and
    ``baseline`` the settings at which it must take the stock step."""

    model: Callable[[Size, bool], torch.nn.Module]
    trainer_cls: type
    config_cls: type
    settings: dict[str, Any]
    baseline: dict[str, Any]
    stock_model: Callable[[Size], torch.nn.Module] | None = None


def _lora(model: torch.nn.Module) -> torch.nn.Module:
    config = LoraConfig(
        r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # LoRA's A is drawn from the global generator
        return get_peft_model(model, config)


def _particles(size: Size, baseline: bool) -> torch.nn.Module:
    count = 1 if baseline else 4
    mode = "loop" if baseline else "vmap"
    return ParticleEnsemble(_lora(size.vit()), num_particles=count, mode=mode).train()


def _vit(size: Size, baseline: bool) -> torch.nn.Module:
    return size.vit()


METHODS: dict[str, Method] = {
    "sam": Method(_vit, SAMTrainer, SAMConfig, {"rho": 0.05}, {"rho": 0.0}),
    "asam": Method(
        _vit, SAMTrainer, SAMConfig, {"rho": 0.5, "adaptive": True}, {"rho": 0.0, "adaptive": True}
    ),
    "agnostic_sam": Method(
        _vit,
        AgnosticSAMTrainer,
        AgnosticSAMConfig,
        {"rho_train": 0.05, "rho_val": 0.05},
        {"rho_train": 0.0, "rho_val": 0.0},
    ),
    "fhbi": Method(
        _particles,
        FHBITrainer,
        FHBIConfig,
        {"num_particles": 4, "rho": 0.02},
        {"num_particles": 1, "rho": 0.0},
        stock_model=lambda size: _lora(size.vit()).train(),
    ),
}


@dataclass
class Step:
    """A prepared trainer and ``step(batch)``: one optimizer step."""

    trainer: Any
    step: Callable[[dict[str, torch.Tensor]], Any]
    scaler: Any = None
    _scaling: Any = None

    def close(self) -> None:
        if self._scaling is not None:
            self._scaling.__exit__(None, None, None)
            self._scaling = None


def build_step(
    method: Method,
    size: Size,
    output_dir: str,
    *,
    stock: bool = False,
    baseline: bool = False,
    precision: str = "bf16",
    init_scale: float | None = None,
) -> Step:
    """One-step trainer of ``method`` (``stock``: the stock ``Trainer`` on the same model) in
    ``precision`` (``bf16`` / ``fp32`` autocast, or ``fp16`` with a GradScaler at
    ``init_scale``; close the returned step to leave accelerate's fp16 state)."""
    common = quiet_training_arguments(
        f"{output_dir}/{next(_counter)}",
        use_cpu=not torch.cuda.is_available(),
        optim="sgd",
        learning_rate=0.01,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        per_device_train_batch_size=size.batch_size,
        bf16=precision == "bf16",
    )
    if stock:
        model = method.stock_model(size) if method.stock_model else method.model(size, True)
        trainer = Trainer(model=model, args=TrainingArguments(**common))
    else:
        settings = method.baseline if baseline else method.settings
        model = method.model(size, baseline)
        args = method.config_cls(**common, **settings)
        trainer = method.trainer_cls(model=model, args=args)
    scaling = scaler = None
    if precision == "fp16":
        scaling = fp16_loss_scaling(trainer.accelerator, init_scale=init_scale or 2.0**16)
        scaler = scaling.__enter__()
    return Step(trainer, trainer_step_fn(trainer, 1_000), scaler, scaling)


def snapshot(step: Step) -> list[torch.Tensor]:
    """Copies of the trained tensors, in order; FHBI's particle 0 in the stock model's order."""
    model = step.trainer.accelerator.unwrap_model(step.trainer.model)
    if isinstance(model, ParticleEnsemble):
        return [p[0].detach().float().clone() for p in model.particles]
    return [p.detach().float().clone() for p in model.parameters() if p.requires_grad]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b):
        raise ValueError(f"different tensor lists: {len(a)} and {len(b)} tensors.")
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def moved(after: list[torch.Tensor], before: list[torch.Tensor]) -> float:
    """The step's size: the largest change of a weight."""
    return max_diff(after, before)


__all__ = ["METHODS", "Method", "Size", "Step", "build_step", "max_diff", "moved", "snapshot"]

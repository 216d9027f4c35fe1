"""Models, batches and one-step trainers of :mod:`benchmarks.device_check`."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
    ViTForImageClassification,
)

import peft_configs  # noqa: F401  (registers the PEFT methods)
from benchmarks.harness import quiet_training_arguments, trainer_step_fn
from hf_extensions.bnn import PeerEnsemble, convert_to_bayesian, fixed_noise
from hf_extensions.fhbi.particles import ParticleEnsemble
from hf_extensions.mixed_precision import fp16_loss_scaling
from hf_extensions.models import tiny_clip, tiny_vit_classifier
from hf_extensions.pga.clip_prompts import CLIPPromptLearner
from peft_configs import PromptPoolConfig, SharedPrefixTuningConfig
from trainers import (
    AgnosticSAMConfig,
    AgnosticSAMTrainer,
    BayesianMutualLearningConfig,
    BayesianMutualLearningTrainer,
    FHBIConfig,
    FHBITrainer,
    PGAConfig,
    PGATrainer,
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

    @property
    def is_real(self) -> bool:
        return self.hidden_size >= 768

    def clip(self):
        """CLIP towers of this width and depth (ViT-B/16-sized for the real size: 768-wide,
        12-layer vision tower at 224 px; ``tiny_clip`` gives both towers 4 heads and a
        feed-forward twice the width), with ``tiny_clip``'s byte-level tokenizer."""
        return tiny_clip(
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            projection_dim=512 if self.is_real else 16,
        )

    def vit(self) -> ViTForImageClassification:
        """A ViT of this size with weights drawn from seed 0 (the same model every call)."""
        return tiny_vit_classifier(
            self.num_labels, self.image_size, self.patch_size, 3, self.hidden_size,
            self.num_layers, self.num_heads, self.intermediate_size, "sdpa", seed=0,
        ).train()  # fmt: skip

    def bert(self, trainable_body: bool = False) -> nn.Module:
        """A ``BertForSequenceClassification`` (BERT-base for the real size), seed 0; with
        ``trainable_body=False`` only the classifier trains (the linear probe under a prompt)."""
        config = BertConfig(
            vocab_size=30522 if self.is_real else 100, hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size, num_labels=self.num_labels,
        )  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = BertForSequenceClassification(config).train()
        if not trainable_body:
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("classifier"))
        return model

    def tokens(self) -> dict[str, torch.Tensor]:
        """A batch of token ids (128 per row at the real size) with labels."""
        generator = torch.Generator().manual_seed(1)
        vocab, length = (30522, 128) if self.is_real else (100, 16)
        ids = torch.randint(0, vocab, (self.batch_size, length), generator=generator)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, self.num_labels, (self.batch_size,), generator=generator),
        }

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
    ``baseline`` the settings at which it must take the stock step (on ``stock_model``, else
    on ``model(size, True)``). ``batch`` builds the inputs (default: ``Size.batch``);
    ``around_step`` wraps every step (BNN: one frozen weight draw, so runs compare exactly).
    ``baseline=None``: no setting of the method is the stock step (the PEFT prompt methods, whose
    exactness the CPU suite checks against PEFT and real tokens); the stock step then only
    times the reference."""

    model: Callable[[Size, bool], nn.Module]
    trainer_cls: type
    config_cls: type
    settings: dict[str, Any]
    baseline: dict[str, Any] | None
    stock_model: Callable[[Size], nn.Module] | None = None
    batch: Callable[[Size], dict[str, Any]] = Size.batch
    around_step: Callable[[nn.Module], Any] | None = None
    arguments: dict[str, Any] = field(default_factory=dict)


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


def _bayesian_vit(size: Size) -> nn.Module:
    return convert_to_bayesian(size.vit()).train()


def _peers(size: Size, baseline: bool) -> nn.Module:
    return PeerEnsemble([_bayesian_vit(size) for _ in range(1 if baseline else 2)])


def _prompted_bert(adapter: Callable[[], Any]) -> Callable[[Size, bool], nn.Module]:
    def build(size: Size, baseline: bool) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # prompts and latents are drawn from the global generator
            return get_peft_model(size.bert(trainable_body=True), adapter()).train()

    return build


_CLASSES = ["zero", "one", "two"]


def _learner(size: Size) -> CLIPPromptLearner:
    clip, tokenizer = size.clip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CLIPPromptLearner(clip, tokenizer, _CLASSES, ["source", "target"],
                                 n_ctx_shared=4, n_ctx_domain=4)  # fmt: skip


class _PromptERM(nn.Module):
    """The stock objective PGA reduces to at ρ = α = 0, trade-off 1: L_target + L_source."""

    def __init__(self, learner: CLIPPromptLearner):
        super().__init__()
        self.learner = learner

    def forward(self, source, target):
        total = 0
        for name, batch in (("target", target), ("source", source)):
            features = self.learner.image_features(batch["pixel_values"])
            total = total + self.learner.domain_loss(features, batch["labels"], name)
        return {"loss": total}


def _domain_batch(size: Size) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(2)
    shape = (size.batch_size, 3, size.image_size, size.image_size)
    return {
        domain: {
            "pixel_values": torch.rand(shape, generator=generator),
            "labels": torch.randint(0, len(_CLASSES), (size.batch_size,), generator=generator),
        }
        for domain in ("source", "target")
    }


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
    "bnn_mutual": Method(
        _peers,
        BayesianMutualLearningTrainer,
        BayesianMutualLearningConfig,
        {
            "kl_weight": 1e-3,
            "kl_dataset_size": 1000,
            "mutual_weight": 1.0,
            "parameter_diversity_weight": 1e-3,
            "feature_diversity_weight": 1e-3,
            "mc_samples": 1,
        },
        {
            "kl_weight": 0.0,
            "mutual_weight": 0.0,
            "parameter_diversity_weight": 0.0,
            "feature_diversity_weight": 0.0,
            "mc_samples": 1,
        },
        stock_model=_bayesian_vit,
        around_step=lambda model: fixed_noise(model, seed=0),
    ),
    "pga": Method(
        lambda size, baseline: _learner(size),
        PGATrainer,
        PGAConfig,
        {"pga_rho": 1e-2, "pga_align": 1e-2, "n_ctx_shared": 4, "n_ctx_domain": 4},
        {
            "pga_rho": 0.0,
            "pga_align": 0.0,
            "pga_tradeoff": 1.0,
            "n_ctx_shared": 4,
            "n_ctx_domain": 4,
        },
        stock_model=lambda size: _PromptERM(_learner(size)),
        batch=_domain_batch,
        arguments={"remove_unused_columns": False},
    ),
    "shared_prefix": Method(
        _prompted_bert(
            lambda: SharedPrefixTuningConfig(
                task_type="SEQ_CLS", num_virtual_tokens=16, share="per_layer_mlp"
            )
        ),
        Trainer,
        TrainingArguments,
        {},
        None,
        stock_model=Size.bert,
        batch=Size.tokens,
    ),
    "prompt_pool": Method(
        _prompted_bert(
            lambda: PromptPoolConfig(
                task_type="SEQ_CLS",
                pool_size=10,
                top_k=5,
                prompt_length=5,
                layers=[0, 1],
                key_source="learned",
            )
        ),
        Trainer,
        TrainingArguments,
        {},
        None,
        stock_model=Size.bert,
        batch=Size.tokens,
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
        **method.arguments,
    )
    if stock:
        model = method.stock_model(size) if method.stock_model else method.model(size, True)
        trainer = Trainer(model=model, args=TrainingArguments(**common))
    else:
        settings = method.baseline if baseline else method.settings
        settings = settings or {}
        model = method.model(size, baseline)
        args = method.config_cls(**common, **settings)
        trainer = method.trainer_cls(model=model, args=args)
    scaling = scaler = None
    if precision == "fp16":
        scaling = fp16_loss_scaling(trainer.accelerator, init_scale=init_scale or 2.0**16)
        scaler = scaling.__enter__()
    step = trainer_step_fn(trainer, 1_000)
    if method.around_step is not None:
        plain = step

        def step(batch):
            with method.around_step(trainer.model):
                return plain(batch)

    return Step(trainer, step, scaler, scaling)


def snapshot(step: Step) -> list[torch.Tensor]:
    """Copies of the trained tensors, in order; FHBI's particle 0 in the stock model's order."""
    model = step.trainer.accelerator.unwrap_model(step.trainer.model)
    if isinstance(model, ParticleEnsemble):
        return [p[0].detach().float().clone() for p in model.particles]
    if isinstance(model, PeerEnsemble):
        model = model.peers[0]
    return [p.detach().float().clone() for p in model.parameters() if p.requires_grad]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b):
        raise ValueError(f"different tensor lists: {len(a)} and {len(b)} tensors.")
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def peak_memory_mib(call: Callable[[], Any]) -> tuple[Any, float | None]:
    """``call()``'s result and the peak CUDA memory it allocated, in MiB (``None`` on the CPU)."""
    if not torch.cuda.is_available():
        return call(), None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    result = call()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() / 2**20


__all__ = [
    "METHODS", "Method", "Size", "Step", "build_step", "max_diff", "peak_memory_mib", "snapshot",
]  # fmt: skip

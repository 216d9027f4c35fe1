"""What the FHBI tests share: LoRA ViT particles, the digits they train on, their arguments."""

import torch
from peft import LoraConfig, get_peft_model

from hf_extensions.data import load_digits
from hf_extensions.fhbi.particles import ParticleEnsemble
from hf_extensions.models import tiny_mlp_classifier, tiny_vit_classifier


def lora_vit(seed=0):
    """A tiny ViT with LoRA on q/v and a trainable head (the paper's particles)."""
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoRA A is drawn from the global generator
        return get_peft_model(tiny_vit_classifier(seed=seed), config)


def train_set(rows=32):
    return load_digits(0)["train"].select(range(rows)).select_columns(["pixel_values", "labels"])


def training_args(tmp_path, **overrides):
    """One SGD step on a batch of 32, nothing saved or reported; ``overrides`` replace keys."""
    values = dict(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=32, optim="sgd",
        learning_rate=0.1, weight_decay=0.0, max_grad_norm=0.0, lr_scheduler_type="constant",
        warmup_steps=0, save_strategy="no", report_to="none", disable_tqdm=True,
        logging_steps=1, seed=0,
    )  # fmt: skip
    values.update(overrides)
    return values


def mlp_particles_and_logits(num_particles=3, rows=16):
    """``(ensemble, inputs, particle_logits)``: MLP particles in training mode, ``rows`` digit
    vectors with labels, and each particle's logits on them."""
    ensemble = ParticleEnsemble(tiny_mlp_classifier(), num_particles=num_particles).train()
    data = load_digits(0, layout="vector")["train"].select(range(rows)).with_format("torch")[:]
    inputs = {"features": data["features"].float(), "labels": data["labels"]}
    logits = ensemble(features=inputs["features"], return_particle_logits=True)["particle_logits"]
    return ensemble, inputs, logits

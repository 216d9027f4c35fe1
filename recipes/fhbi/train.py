"""FHBI recipe: Bayesian fine-tuning with m LoRA particles + heads, :class:`trainers.FHBITrainer`.

Embedded default (offline, CPU, 1-3 minutes): a tiny ViT on scikit-learn's digits, 4
particles, each a LoRA adapter (r=8, α=8 on every attention and MLP projection, since the tiny
ViT's backbone is random, not pretrained) plus its own linear head::

    accelerate launch recipes/fhbi/train.py --config recipes/fhbi/digits.yaml

Two CPU processes (data parallel over gloo)::

    accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml \
        recipes/fhbi/train.py --config recipes/fhbi/digits.yaml

Paper scale (needs Hub access and GPUs): ViT-B/16 (ImageNet-21k) on a VTAB-1K task, LoRA r=8
on query/value::

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \
        recipes/fhbi/train.py --config recipes/fhbi/vtab_vit_b16.yaml

Baselines are settings: ``--rho 0`` is SVGD, ``--kernel none`` a deep ensemble. Every field of
``FHBIConfig``, ``LoraArguments`` and ``TrainingArguments`` can be set in the YAML or on the
command line; ``--help`` lists them. The saved output holds one PEFT adapter per particle
(``particle_<i>/``) and the model they apply to (``base_model/``), reloadable with
``ParticleEnsemble.from_pretrained(AutoModelForImageClassification.from_pretrained(
f"{dir}/base_model"), dir)`` (the model card has the snippet).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, get_peft_model
from transformers import set_seed

from hf_extensions.cli import (
    CLASSIFICATION_SUMMARY,
    RecipeArgumentParser,
    run_as_script,
    save_base_model,
    trainer_artifact,
)
from hf_extensions.demo import Comparison, run_comparison
from hf_extensions.fhbi.particles import EVALUATION_MODES, ParticleEnsemble
from hf_extensions.models.image_classification import (
    ImageClassificationArguments,
    build_model,
    train_image_classifier,
)
from hf_extensions.validation import check_choice, check_integer
from trainers.fhbi_config import FHBIConfig
from trainers.fhbi_trainer import FHBITrainer

RECIPE_DIR = Path(__file__).resolve().parent


@dataclass
class LoraArguments:
    """The particles' adapters: LoRA on the backbone, a fresh head per particle."""

    lora_r: int = field(default=8, metadata={"help": "LoRA rank (paper: 8)."})
    lora_alpha: float = field(default=8, metadata={"help": "LoRA alpha (paper: 8)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="q_proj,v_proj",
        metadata={"help": "Comma-separated module names that get LoRA (paper: query, value)."},
    )
    head_modules: str = field(
        default="classifier",
        metadata={"help": "Comma-separated modules trained in full, one copy per particle."},
    )
    particle_mode: str = field(
        default="auto",
        metadata={
            "help": "Particle evaluation: auto, stacked, vmap or loop.",
            "choices": EVALUATION_MODES,
        },
    )

    def __post_init__(self):
        check_integer("lora_r", self.lora_r, low=1)
        check_choice("particle_mode", self.particle_mode, EVALUATION_MODES)


def build_ensemble(model, lora: LoraArguments, num_particles: int, seed: int) -> ParticleEnsemble:
    """``model`` with LoRA adapters and trainable heads, as ``num_particles`` particles."""
    config = LoraConfig(
        r=lora.lora_r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=[m.strip() for m in lora.lora_target_modules.split(",") if m.strip()],
        modules_to_save=[m.strip() for m in lora.head_modules.split(",") if m.strip()],
    )
    return ParticleEnsemble(
        get_peft_model(model, config), num_particles, seed=seed, mode=lora.particle_mode
    )


def main(argv: list[str] | None = None) -> tuple[FHBITrainer, dict[str, float]]:
    """Train, evaluate the particle average on the test split, save adapters + card, push."""
    parser = RecipeArgumentParser((ImageClassificationArguments, LoraArguments, FHBIConfig))
    script_args, lora_args, config = parser.parse(argv)

    def particles(names: list[str]) -> ParticleEnsemble:
        set_seed(config.seed)  # LoRA A matrices are drawn from the global generator
        model = build_model(script_args, names)
        save_base_model(config.output_dir, model)  # the particles' adapters apply to it
        return build_ensemble(model, lora_args, config.num_particles, config.seed)

    return train_image_classifier(FHBITrainer, script_args, config, particles)


def demo() -> Comparison:
    """4 LoRA particles of the zoo's ViT on held-out styles, beside SVGD (``rho`` 0)."""
    return run_comparison(
        method=main,
        baseline_name="SVGD (rho 0)",
        baseline_flags=["--rho", "0"],
        config=RECIPE_DIR / "zoo_vit.yaml",
        summary=CLASSIFICATION_SUMMARY,
        lower_is_better=("test NLL", "test ECE"),
        fixture="vit",
    )


def artifact(result):
    """The saved model and the line that loads it (printed at the end of a run)."""
    return trainer_artifact(result[0])


if __name__ == "__main__":
    run_as_script(main, CLASSIFICATION_SUMMARY, artifacts=artifact)

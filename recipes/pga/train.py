"""PGA recipe: unsupervised domain adaptation of CLIP prompts with :class:`trainers.PGATrainer`.

Embedded default (offline, CPU, a couple of minutes): scikit-learn's digits (source, labelled)
-> the same digits rotated by 22.5 degrees (target, unlabelled), with a tiny CLIP built from a
config and *briefly pretrained here* (seeded, ``clip_pretrain_steps`` steps of image-to-class-text
cross-entropy on the source training split) so that its zero-shot pseudo-labels mean something::

    accelerate launch recipes/pga/train.py --config recipes/pga/digits.yaml

Two CPU processes (data parallel over gloo)::

    accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml \
        recipes/pga/train.py --config recipes/pga/digits.yaml

Paper scale (needs Hub access and a GPU): a Hub CLIP on Office-Home or DomainNet, one domain
as target and the others as sources (``multi_source: true`` for more than one)::

    accelerate launch recipes/pga/train.py --config recipes/pga/office_home.yaml

Target labels are never used for training: the target split is pseudo-labelled by the frozen
CLIP's zero-shot prediction (kept when its confidence is >= ``pseudo_label_threshold``). The
validation split reports target accuracy during training; the test split is scored once at the
end (no selection on test). Every field of ``PGAConfig`` and ``TrainingArguments`` can be set in
the YAML or on the command line; ``--help`` lists them.

The output folder holds the learner's tensors (``model.safetensors``: the prompt contexts and the
frozen CLIP), the CLIP and its tokenizer (``base_model/``), the learner's settings
(``prompt_learner.json``) and a model card whose snippet rebuilds the learner and classifies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import load_dataset
from transformers import CLIPModel, CLIPProcessor

from hf_extensions.cli import (
    RecipeArgumentParser,
    finish_training,
    process_state,
    run_as_script,
    run_demo,
    run_training,
    save_base_model,
    trainer_artifact,
)
from hf_extensions.data.hard_digits import STYLES, render_hard_digits
from hf_extensions.demo import Comparison
from hf_extensions.metrics import compute_classification_metrics
from hf_extensions.models import tiny_clip
from hf_extensions.models.image_classification import HARD_DIGITS
from hf_extensions.pga.clip_prompts import (
    DIGIT_WORDS,
    CLIPPromptLearner,
    as_tensors,
    digit_domains,
    pretrain_clip_on_labels,
)
from hf_extensions.validation import check_choice, refuse
from hf_extensions.zoo import fixture_path
from hf_extensions.zoo.building import read_quality
from trainers.pga_config import PGAConfig
from trainers.pga_trainer import PairedDomainDataset, PGATrainer

RECIPE_DIR = Path(__file__).resolve().parent
#: The prompt learner's settings (``CLIPPromptLearner`` keyword arguments) in the output folder.
PROMPT_LEARNER_FILE = "prompt_learner.json"


@dataclass
class PGAScriptArguments:
    """Which CLIP, which domains."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or path of a CLIP model (e.g. openai/clip-vit-base-patch16). Empty: a "
            "tiny CLIP from a config, pretrained here on the source digits (offline)."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset with a domain column; 'hard_digits': the embedded hard digits, "
            "whose styles are the domains (with the zoo's CLIP). Empty: digits -> shifted digits."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of the Hub dataset."})
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the labels."})
    domain_column: str = field(default="domain", metadata={"help": "Column naming the domain."})
    source_domains: list[str] = field(
        default_factory=list,
        metadata={"help": "Values of the domain column (hard digits: styles) used as sources."},
    )
    target_domain_name: str | None = field(
        default=None,
        metadata={"help": "Value of the domain column (hard digits: a style) used as target."},
    )
    hard_digits_images: int = field(
        default=2000,
        metadata={"help": "Hard digits: training images per domain (validation, test: half)."},
    )
    validation_size: float = field(
        default=0.1,
        metadata={"help": "Fraction of each domain held out for validation and for test."},
    )
    target_shift: str = field(
        default="rotate", metadata={"help": "Digits: the target shift (rotate/invert/noise/scale)."}
    )
    shift_severity: float = field(default=0.5, metadata={"help": "Digits: shift severity."})
    clip_pretrain_steps: int = field(
        default=300, metadata={"help": "Digits: steps of pretraining the tiny CLIP on the source."}
    )


def _digits(script_args: PGAScriptArguments, config: PGAConfig):
    domains = digit_domains(
        config.seed, target_shift=script_args.target_shift, severity=script_args.shift_severity
    )
    clip, tokenizer = tiny_clip(seed=config.seed)
    source = as_tensors(domains["source"]["train"])
    pretrain_clip_on_labels(
        clip,
        tokenizer,
        source["pixel_values"],
        source["labels"],
        DIGIT_WORDS,
        steps=script_args.clip_pretrain_steps,
        learning_rate=1e-3,
        seed=config.seed,
    )
    splits = {
        name: {split: as_tensors(domains[name][split]) for split in domains[name]}
        for name in domains
    }
    return clip, tokenizer, list(DIGIT_WORDS), splits, ["source"]


def _check_domains(script_args: PGAScriptArguments) -> None:
    if not script_args.source_domains:
        refuse("source_domains", "a non-empty list with a dataset", script_args.source_domains)
    if script_args.target_domain_name is None:
        refuse("target_domain_name", "a domain name with a dataset", None)


def _hard_digits(script_args: PGAScriptArguments, config: PGAConfig):
    """The zoo's CLIP (or any CLIP at ``model_name_or_path``) with hard-digit styles as domains:
    images normalised as its processor does, every domain from its own random stream."""
    _check_domains(script_args)
    if script_args.model_name_or_path is None:
        refuse(
            "model_name_or_path", "a CLIP folder or Hub id with hard digits (e.g. zoo/clip)", None
        )
    for style in [*script_args.source_domains, script_args.target_domain_name]:
        check_choice("source_domains / target_domain_name", style, tuple(STYLES))
    clip = CLIPModel.from_pretrained(script_args.model_name_or_path)
    processor = CLIPProcessor.from_pretrained(script_args.model_name_or_path)
    images = processor.image_processor
    mean = torch.tensor(images.image_mean).view(1, 3, 1, 1) if images.do_normalize else 0.0
    std = torch.tensor(images.image_std).view(1, 3, 1, 1) if images.do_normalize else 1.0
    sizes = {"train": script_args.hard_digits_images}
    sizes |= {"validation": max(1, sizes["train"] // 2), "test": max(1, sizes["train"] // 2)}
    roles = {name: name for name in script_args.source_domains}
    roles[script_args.target_domain_name] = config.target_domain
    splits = {}
    for index, (style, role) in enumerate(roles.items()):
        splits[role] = {}
        for split, count in sizes.items():
            batch = render_hard_digits(
                count, split=split, styles=(style,), seed=1000 * config.seed + index
            )
            splits[role][split] = {
                "pixel_values": (batch.images - mean) / std,
                "labels": batch.digits,
            }
    return clip, processor.tokenizer, list(DIGIT_WORDS), splits, list(script_args.source_domains)


def _hub(script_args: PGAScriptArguments, config: PGAConfig):
    _check_domains(script_args)
    clip = CLIPModel.from_pretrained(script_args.model_name_or_path)
    processor = CLIPProcessor.from_pretrained(script_args.model_name_or_path)
    data = load_dataset(script_args.dataset_name, split=script_args.dataset_split)
    names = data.features[script_args.label_column].names
    names = [name.replace("_", " ") for name in names]

    def transform(batch):
        images = [image.convert("RGB") for image in batch[script_args.image_column]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.as_tensor(batch[script_args.label_column])}

    splits = {}
    roles = {name: name for name in script_args.source_domains}
    roles[script_args.target_domain_name] = config.target_domain
    for value, role in roles.items():
        domain = data.filter(lambda row, v=value: row[script_args.domain_column] == v)
        held = domain.train_test_split(test_size=2 * script_args.validation_size, seed=config.seed)
        val_test = held["test"].train_test_split(test_size=0.5, seed=config.seed)
        parts = {"train": held["train"], "validation": val_test["train"], "test": val_test["test"]}
        splits[role] = {k: v.with_transform(transform) for k, v in parts.items()}
    return clip, processor.tokenizer, names, splits, list(script_args.source_domains)


def _column(split, name: str) -> torch.Tensor:
    if isinstance(split, dict):
        return split[name]
    loader = torch.utils.data.DataLoader(split, batch_size=64)
    return torch.cat([torch.as_tensor(batch[name]) for batch in loader])


def _eval_dataset(split):
    if not isinstance(split, dict):
        return split
    from datasets import Dataset

    return Dataset.from_dict({k: v.numpy() for k, v in split.items()}).with_format("torch")


def main(argv: list[str] | None = None) -> tuple[PGATrainer, dict[str, float]]:
    """Pseudo-label the target, train the prompts, evaluate on the target test split, save."""
    parser = RecipeArgumentParser((PGAScriptArguments, PGAConfig))
    script_args, config = parser.parse(argv)
    if script_args.dataset_name == HARD_DIGITS:
        build = _hard_digits
    else:
        build = _digits if script_args.model_name_or_path is None else _hub
    clip, tokenizer, names, splits, sources = build(script_args, config)
    torch.manual_seed(config.seed)
    settings = {
        "class_names": list(names),
        "domains": [*sources, config.target_domain],
        "n_ctx_shared": config.n_ctx_shared,
        "n_ctx_domain": config.n_ctx_domain,
        "class_specific_shared": config.class_specific_shared,
    }
    learner = CLIPPromptLearner(clip, tokenizer, **settings).to(config.device)
    # what rebuilds the learner in a fresh process (the card's usage snippet): the CLIP it
    # prompts, and its settings; the trained contexts are the Trainer's model.safetensors
    save_base_model(config.output_dir, clip, tokenizer)
    if process_state().is_main_process:
        path = Path(config.output_dir) / PROMPT_LEARNER_FILE
        path.write_text(json.dumps(settings, indent=2) + "\n")
    target = splits[config.target_domain]
    pseudo = learner.pseudo_labels(
        _column(target["train"], "pixel_values").to(config.device), config.pseudo_label_threshold
    ).cpu()
    train_splits = {name: splits[name]["train"] for name in sources}
    train_splits[config.target_domain] = {
        "pixel_values": _column(target["train"], "pixel_values"),
        "labels": pseudo,
    }
    test = _eval_dataset(target["test"])
    zero_shot = learner.zero_shot_proba(
        _column(target["test"], "pixel_values").to(config.device)
    ).argmax(-1)
    zero_shot_accuracy = float(
        (zero_shot.cpu() == _column(target["test"], "labels")).float().mean()
    )
    trainer = PGATrainer(
        model=learner,
        args=config,
        train_dataset=PairedDomainDataset(train_splits, seed=config.seed),
        eval_dataset=_eval_dataset(target["validation"]),
        compute_metrics=compute_classification_metrics,
    )
    dataset = {None: "scikit-learn digits", HARD_DIGITS: "hf-extensions hard digits"}.get(
        script_args.dataset_name, script_args.dataset_name
    )
    run_training(trainer)
    metrics = finish_training(trainer, test, dataset=dataset)
    metrics["test_zero_shot_accuracy"] = zero_shot_accuracy
    metrics["pseudo_label_coverage"] = float((pseudo != -100).float().mean())
    return trainer, metrics


#: Target test accuracy after PGA against CLIP's zero-shot start, and the pseudo-label coverage.
SUMMARY = {
    "target test accuracy (PGA)": "test_accuracy",
    "target test accuracy (zero-shot)": "test_zero_shot_accuracy",
    "pseudo-label coverage": "pseudo_label_coverage",
}


def demo() -> Comparison:
    """The zoo's CLIP adapted from the noisy to the cluttered hard digits: PGA beside the same
    prompt learning without gradient alignment (``pga_align`` 0, ``pga_rho`` 0), and beside
    the zero-shot CLIP it starts from; target test accuracy."""
    flags = ["--model_name_or_path", str(fixture_path("clip"))]
    config = RECIPE_DIR / "zoo_clip.yaml"
    ablation = run_demo(main, config, SUMMARY, *flags, "--pga_align", "0", "--pga_rho", "0")
    method = run_demo(main, config, SUMMARY, *flags)
    accuracy, zero_shot = "target test accuracy (PGA)", "target test accuracy (zero-shot)"
    return Comparison(
        baseline="ERM prompts (pga_rho = pga_align = 0)",
        metrics={
            "target test accuracy": (ablation[accuracy], method[accuracy]),
            "target accuracy vs zero-shot": (method[zero_shot], method[accuracy]),
            "pseudo-label coverage": (
                ablation["pseudo-label coverage"],
                method["pseudo-label coverage"],
            ),
        },
        fixture="clip",
        fixture_quality=read_quality(fixture_path("clip"))["quality"],
    )


def artifact(result):
    """The saved prompt learner and the line that loads it (printed at the end of a run)."""
    return trainer_artifact(result[0])


if __name__ == "__main__":
    run_as_script(main, SUMMARY, artifacts=artifact)

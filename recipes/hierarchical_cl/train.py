"""Class-incremental prompt learning with a label taxonomy and optimal transport, with ``Trainer``.

Tran et al., "Leveraging Hierarchical Taxonomies in Prompt-based Continual Learning" (arXiv
2410.04327) on HiDe-Prompt: a frozen pretrained ViT, one prefix prompt per task
(``PromptPoolConfig`` with task-indexed selection), a task-identity head on the frozen features,
pseudo-feature replay from stored class mixtures, classifier alignment after each task, plus
supervised-contrastive terms over the taxonomy's leaf groups weighted by OT distances
(``HierarchicalPromptCLTrainer``). ``hierarchical: false`` runs the HiDe-Prompt learner alone.

Settings (one YAML each):

- ``digits.yaml`` (default, CPU, offline): scikit-learn's digits as 5 tasks of 2 classes (class
  order drawn from ``class_order_seed``), the taxonomy ``digits_taxonomy.json``; the frozen
  backbone is a tiny ViT trained here on a held-out 30% of the images (standing in for
  ImageNet-21k pretraining), its head replaced.
- ``cifar100.yaml``: Split CIFAR-100 (10 tasks of 10 classes) with ViT-B/16 (ImageNet-21k) from
  the Hub; the taxonomy is the dataset's 20 superclasses (``coarse_label_column``).
- ``imagenet_r.yaml``: Split ImageNet-R (10 tasks of 20 classes) with ViT-B/16; no coarse labels,
  so the tree is built by agglomerative clustering of the frozen class means (our addition) unless
  ``taxonomy_file`` is given.

Launch with Accelerate, e.g.::

    accelerate launch recipes/hierarchical_cl/train.py --config recipes/hierarchical_cl/digits.yaml
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \\
        recipes/hierarchical_cl/train.py --config recipes/hierarchical_cl/cifar100.yaml

The run saves the adapter (all task prompts + the aligned head; ``PeftModel.from_pretrained``
onto the frozen backbone saved in ``base_model/``), the continual state beside it
(task-identity head, class mixtures, taxonomy; reload with
``HierarchicalPromptCLTrainer.load_continual_state``), ``accuracy_matrix.json`` and a model card
with final average accuracy and forgetting and the code that reloads and runs the learner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from datasets import ClassLabel, DatasetDict, load_dataset
from peft import get_peft_model
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    DefaultDataCollator,
    set_seed,
)

import peft_configs  # noqa: F401  (registers the prompt pool with PEFT)
from hf_extensions.cli import (
    RecipeArgumentParser,
    finish_training,
    run_as_script,
    save_base_model,
    trainer_artifact,
)
from hf_extensions.data import CLASS_NAMES, class_incremental_stream, load_digits
from hf_extensions.data.hard_digits import DIGIT_WORDS, load_hard_digits
from hf_extensions.demo import Comparison, run_comparison
from hf_extensions.hierarchical_cl.taxonomy import DIGITS_TAXONOMY, LabelTree
from hf_extensions.models.image_classification import HARD_DIGITS, digits_backbone
from hf_extensions.validation import refuse
from peft_configs.prompt_pool import PromptPoolConfig
from trainers.hierarchical_cl_config import HierarchicalPromptCLConfig
from trainers.hierarchical_cl_trainer import HierarchicalPromptCLTrainer

RECIPE_DIR = Path(__file__).resolve().parent


@dataclass
class HierarchicalCLScriptArguments:
    """Stream, backbone and prompts of a run."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of a pretrained image classifier (e.g. "
            "google/vit-base-patch16-224-in21k). Empty: a tiny ViT trained here (digits)."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset (e.g. uoft-cs/cifar100); 'hard_digits': the embedded hard "
            "digits' digit x ink classes under their digit (with the zoo's ViT). Empty: digits."
        },
    )
    hard_digits_styles: list[str] = field(
        default_factory=lambda: ["cluttered", "blurred"],
        metadata={"help": "Hard digits: the styles drawn from."},
    )
    hard_digits_images: int = field(
        default=4000, metadata={"help": "Hard digits: training images (test: half)."}
    )
    image_column: str = field(default="img", metadata={"help": "Hub dataset: image column."})
    label_column: str = field(default="fine_label", metadata={"help": "Hub: class column."})
    coarse_label_column: str | None = field(
        default=None,
        metadata={"help": "Hub: a superclass column; its values become the taxonomy's leaves."},
    )
    taxonomy_file: str | None = field(
        default=None,
        metadata={
            "help": "JSON nested dict (leaves list class names or ids). Empty and no coarse "
            "column: agglomerative clustering of frozen class means."
        },
    )
    num_tasks: int = field(default=5, metadata={"help": "Tasks of the class-incremental stream."})
    class_order_seed: int | None = field(
        default=0, metadata={"help": "Seed of the class order (None: ascending)."}
    )
    prompt_length: int = field(default=5, metadata={"help": "Prefix length per prompted layer."})
    prompt_layers: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3, 4], metadata={"help": "Prompted layers (HiDe: 0-4)."}
    )
    upstream_fraction: float = field(
        default=0.3, metadata={"help": "Digits: share of images used to pretrain the backbone."}
    )
    upstream_epochs: int = field(default=30, metadata={"help": "Digits: backbone epochs."})
    vit_layers: int = field(default=4, metadata={"help": "Digits: depth of the tiny ViT."})
    vit_hidden_size: int = field(default=32, metadata={"help": "Digits: width of the tiny ViT."})


def _digits(script_args: HierarchicalCLScriptArguments, config: HierarchicalPromptCLConfig):
    data = load_digits(config.seed, validation_size=script_args.upstream_fraction)
    backbone = digits_backbone(
        data["validation"],
        seed=config.seed,
        num_layers=script_args.vit_layers,
        hidden_size=script_args.vit_hidden_size,
        epochs=script_args.upstream_epochs,
    )
    stream = class_incremental_stream(
        DatasetDict(train=data["train"], test=data["test"]),
        script_args.num_tasks,
        seed=script_args.class_order_seed,
    )
    taxonomy = script_args.taxonomy_file or str(DIGITS_TAXONOMY)
    tree = LabelTree.from_json(taxonomy, {name: i for i, name in enumerate(CLASS_NAMES)})
    return backbone, stream, tree, "scikit-learn digits"


def _hard_digits(script_args: HierarchicalCLScriptArguments, config: HierarchicalPromptCLConfig):
    """Fine classes digit x ink (40 with four inks), each under its digit in the taxonomy (a
    real hierarchy), on a frozen pretrained backbone (the zoo's ViT by default)."""
    if script_args.model_name_or_path is None:
        refuse(
            "model_name_or_path", "a pretrained image classifier with hard digits (zoo/vit)", None
        )
    sizes = {"train": script_args.hard_digits_images, "test": script_args.hard_digits_images // 2}
    data = load_hard_digits(
        sizes, styles=script_args.hard_digits_styles, label="fine", seed=config.seed
    )
    names = data["train"].features["labels"].names
    tree = LabelTree.from_coarse_labels(
        data["train"]["labels"], data["train"]["digit"], list(DIGIT_WORDS)
    )
    model = AutoModelForImageClassification.from_pretrained(
        script_args.model_name_or_path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        ignore_mismatched_sizes=True,
    )
    keep = DatasetDict(
        {split: data[split].select_columns(["pixel_values", "labels"]) for split in data}
    )
    stream = class_incremental_stream(
        keep, script_args.num_tasks, seed=script_args.class_order_seed
    )
    return model, stream, tree, "hf-extensions hard digits"


def _hub(script_args: HierarchicalCLScriptArguments, config: HierarchicalPromptCLConfig):
    raw = load_dataset(script_args.dataset_name)
    if "train" not in raw or "test" not in raw:
        raise ValueError(
            f"{script_args.dataset_name!r} needs train and test splits, has {list(raw)}."
        )
    raw = raw.rename_column(script_args.label_column, "labels")
    names = raw["train"].features["labels"]
    names = names.names if isinstance(names, ClassLabel) else None
    tree = None
    if script_args.taxonomy_file:
        ids = {name: i for i, name in enumerate(names or [])}
        tree = LabelTree.from_json(script_args.taxonomy_file, ids)
    elif script_args.coarse_label_column:
        column = raw["train"].features[script_args.coarse_label_column]
        tree = LabelTree.from_coarse_labels(
            raw["train"]["labels"],
            raw["train"][script_args.coarse_label_column],
            column.names if isinstance(column, ClassLabel) else None,
        )
    num_labels = len(names) if names else int(max(raw["train"]["labels"])) + 1
    model = AutoModelForImageClassification.from_pretrained(
        script_args.model_name_or_path, num_labels=num_labels, ignore_mismatched_sizes=True
    )
    processor = AutoImageProcessor.from_pretrained(script_args.model_name_or_path)

    def transform(batch):
        images = [image.convert("RGB") for image in batch[script_args.image_column]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": batch["labels"]}

    keep = DatasetDict(train=raw["train"], test=raw["test"])
    stream = class_incremental_stream(
        keep, script_args.num_tasks, seed=script_args.class_order_seed
    )
    for task in stream.tasks:
        for split in list(task):
            task[split] = task[split].with_transform(transform)
    return model, stream, tree, script_args.dataset_name


def main(argv: list[str] | None = None) -> tuple[HierarchicalPromptCLTrainer, dict]:
    """Learn the stream task by task, evaluating all seen tasks after each; save."""
    parser = RecipeArgumentParser((HierarchicalCLScriptArguments, HierarchicalPromptCLConfig))
    script_args, config = parser.parse(argv)
    set_seed(config.seed)
    builders = {None: _digits, HARD_DIGITS: _hard_digits}
    build = builders.get(script_args.dataset_name, _hub)
    backbone, stream, tree, dataset_name = build(script_args, config)
    depth = backbone.config.num_hidden_layers
    layers = [i for i in script_args.prompt_layers if i < depth]
    save_base_model(config.output_dir, backbone)  # the frozen backbone the adapter applies to
    pool = get_peft_model(
        backbone,
        PromptPoolConfig(
            pool_size=len(stream),
            top_k=1,
            prompt_length=script_args.prompt_length,
            layers=layers,
            key_source="fixed",
            modules_to_save=[config.head_name],
        ),
    )
    # digits rows carry sample_id/task_id (dropped); Hub rows are transformed on the fly, and
    # their image column must reach the transform (the HF image-classification convention)
    config.remove_unused_columns = script_args.dataset_name in (None, HARD_DIGITS)
    trainer = HierarchicalPromptCLTrainer(
        pool, config, taxonomy=tree, data_collator=DefaultDataCollator()
    )
    # checkpoints (save_strategy) go to output_dir/task-t/; `last` resumes the newest complete one
    result = trainer.fit_stream(stream, resume_from_checkpoint=config.resume_from_checkpoint)
    metrics = {
        "test_final_average_accuracy": result["faa"],
        "test_forgetting": result["forgetting"],
        "test_task_identity_accuracy": result["tii_accuracy"][-1],
    }
    trainer.log(metrics)
    if trainer.is_world_process_zero():
        output_dir = Path(config.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "accuracy_matrix.json").write_text(json.dumps(result, indent=2))
    # save; write the card, or push model, backbone, matrix and card in one commit
    finish_training(trainer, dataset=dataset_name)
    return trainer, {**metrics, **result}


#: Final average accuracy over the stream, forgetting, and task-identity accuracy at the end.
SUMMARY = {
    "final average accuracy": "test_final_average_accuracy",
    "forgetting": "test_forgetting",
    "task-identity accuracy": "test_task_identity_accuracy",
}


def demo() -> Comparison:
    """The zoo's frozen ViT learning 40 digit x ink classes in 5 tasks (held-out styles), the
    taxonomy and OT terms beside the same prompts without them (HiDe-Prompt); final average
    accuracy and forgetting."""
    return run_comparison(
        method=main,
        baseline_name="no taxonomy / OT (HiDe-Prompt)",
        baseline_flags=["--hierarchical", "false", "--use_ot", "false"],
        config=RECIPE_DIR / "zoo_vit.yaml",
        summary=SUMMARY,
        lower_is_better=("forgetting",),
        fixture="vit",
    )


def artifact(result):
    """The saved learner and the line that loads it (printed at the end of a run)."""
    return trainer_artifact(result[0])


if __name__ == "__main__":
    run_as_script(main, SUMMARY, artifacts=artifact)

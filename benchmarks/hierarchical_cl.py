"""Hierarchical-taxonomy prompt continual learning: FAA / forgetting, mechanism, step overhead.

Tran et al., "Leveraging Hierarchical Taxonomies in Prompt-based Continual Learning" (arXiv
2410.04327). The learner (``HierarchicalPromptCLTrainer``, HiDe-Prompt with task-indexed prompts)
runs on scikit-learn's digits as 5 tasks of 2 classes, 4 seeds (seed s: the data split, the class
order, the backbone and the training all use s), in three variants:

- ``base``: the hierarchical terms off (HiDe-Prompt alone);
- ``tree``: + global and per-leaf-group SupCon, Γ = 1 (no OT);
- ``tree_ot``: + the OT weighting Γ = exp(−W/δ) (the paper's full method);

and ``tree_ot_paper_weights`` (a sensitivity row); ``tree_ot_eval_rescoring`` is the learned
``tree_ot`` evaluated after the last task with the official group re-scoring (``eval_rescoring``). Fixed before any run, not tuned here: the
regulariser weights of the official CIFAR-100 script (``reg`` 0.1, ``reg_glob`` 0.05,
``reg_sub`` 0.1; the paper's text gives 0.001 / 0.01: the sensitivity row), δ = 100, τ = 0.1,
10 centroids per class, 5 epochs per task at Adam 0.03, batch 32, 5 prompt tokens on layers
0-3, the taxonomy ``hf_extensions/hierarchical_cl/digits_taxonomy.json``.

The frozen backbone stands in for ImageNet-21k pretraining: a tiny ViT (4 layers, width 32)
trained here on a held-out 30% of the images (``load_digits(validation_size=0.3)``'s validation
split), head replaced; the stream uses the train (50%) and test (20%) splits.

Mechanism: from the base learner's state after task t−1, task t is learned twice (with and
without the hierarchical terms, everything else equal) and the mean cosine between the new
classes' features and the stored means of earlier classes in the same leaf group is compared.

Overhead: one optimizer step of ``tree_ot`` vs ``base`` (interleaved, same state: after three
tasks, so replay and OT are active), on the benchmark's tiny ViT and on a wider ViT (width 192,
6 layers, 32x32 inputs) where the backbone's share of a step is closer to ViT-B's.

    python -m benchmarks.hierarchical_cl            # ~10 minutes on 2 CPU cores
    python -m benchmarks.hierarchical_cl --quick    # smoke run (1 seed, 1 epoch)
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
from datasets import DatasetDict
from peft import get_peft_model
from transformers import DefaultDataCollator, PrinterCallback, set_seed

import peft_configs  # noqa: F401
from benchmarks.harness import (
    BenchmarkReport,
    compare,
    get_pyplot,
    make_parser,
    mean_std,
    quiet_training_arguments,
    save_plot,
    torch_threads,
    trainer_step_fn,
)
from hf_extensions.data import CLASS_NAMES, class_incremental_stream, load_digits
from hf_extensions.hierarchical_cl.taxonomy import DIGITS_TAXONOMY, LabelTree
from hf_extensions.models import tiny_vit_classifier
from hf_extensions.models.image_classification import digits_backbone
from peft_configs.prompt_pool import PromptPoolConfig
from trainers.hierarchical_cl_config import HierarchicalPromptCLConfig
from trainers.hierarchical_cl_trainer import HierarchicalPromptCLTrainer

NAME = "hierarchical_cl"
OFFICIAL_WEIGHTS = {"hide_reg": 0.1, "reg_glob": 0.05, "reg_sub": 0.1}
PAPER_WEIGHTS = {"hide_reg": 0.1, "reg_glob": 0.001, "reg_sub": 0.01}
VARIANTS = {
    "base": {"hierarchical": False, "use_ot": False, **OFFICIAL_WEIGHTS},
    "tree": {"hierarchical": True, "use_ot": False, **OFFICIAL_WEIGHTS},
    "tree_ot": {"hierarchical": True, "use_ot": True, **OFFICIAL_WEIGHTS},
    "tree_ot_paper_weights": {"hierarchical": True, "use_ot": True, **PAPER_WEIGHTS},
}
PROMPT = {"prompt_length": 5, "layers": [0, 1, 2, 3]}


def taxonomy() -> LabelTree:
    ids = {name: i for i, name in enumerate(CLASS_NAMES)}
    return LabelTree.from_json(DIGITS_TAXONOMY, ids)


def setting(seed: int):
    """(frozen backbone with a fresh head, 5-task stream) of one seed."""
    data = load_digits(seed, validation_size=0.3)
    backbone = digits_backbone(data["validation"], seed=seed)  # the recipe's digits defaults
    stream = class_incremental_stream(
        DatasetDict(train=data["train"], test=data["test"]), 5, seed=seed
    )
    return backbone, stream


def make_trainer(backbone, variant: dict, seed: int, epochs: float, output_dir: str):
    set_seed(seed)  # the prompts are drawn here: every variant of a seed starts from the same ones
    pool = get_peft_model(
        copy.deepcopy(backbone),
        PromptPoolConfig(
            pool_size=5, top_k=1, key_source="fixed", modules_to_save=["classifier"], **PROMPT
        ),
    )
    args = HierarchicalPromptCLConfig(
        **quiet_training_arguments(
            output_dir,
            per_device_train_batch_size=32,
            num_train_epochs=epochs,
            learning_rate=0.03,
            seed=seed,
        ),
        **variant,
    )
    trainer = HierarchicalPromptCLTrainer(
        pool, args, taxonomy=taxonomy(), data_collator=DefaultDataCollator()
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def fork(trainer: HierarchicalPromptCLTrainer, variant: dict, state_dir: str):
    """A copy of ``trainer``'s learner (prompts, head, mixtures, TII head) with other settings."""
    trainer.save_continual_state(state_dir)
    args = copy.copy(trainer.args)
    for key, value in variant.items():
        setattr(args, key, value)
    copy_ = HierarchicalPromptCLTrainer(
        copy.deepcopy(trainer.model), args, taxonomy=taxonomy(), data_collator=DefaultDataCollator()
    )
    copy_.remove_callback(PrinterCallback)
    copy_.load_continual_state(state_dir)
    return copy_


def mechanism(backbone, stream, seed: int, epochs: float, work: str) -> dict[str, list[float]]:
    """Same-group cosine of task t learned from the base state after t−1, with / without."""
    base = make_trainer(backbone, VARIANTS["base"], seed, epochs, work)
    values: dict[str, list[float]] = {"base": [], "tree_ot": []}
    for task in range(len(stream)):
        if task > 0:
            for name in values:
                learner = fork(base, VARIANTS[name], f"{work}/fork")
                out = learner.train_task(stream[task]["train"], stream.task_classes[task])
                values[name].append(out.get("same_group_cosine", float("nan")))
        base.train_task(stream[task]["train"], stream.task_classes[task])
    return values


def final_accuracy_rescored(trainer: HierarchicalPromptCLTrainer, stream) -> float:
    """FAA of a learned stream with the official evaluation re-scoring switched on."""
    trainer.args.eval_rescoring = True
    try:
        accuracy = trainer.evaluate_seen([task["test"] for task in stream])["accuracy"]
    finally:
        trainer.args.eval_rescoring = False
    return float(np.mean(accuracy))


def step_overhead(backbone, stream, epochs: float, work: str, repeats: int) -> float:
    """Median step time of tree_ot / base from the same state after three tasks."""
    base = make_trainer(backbone, VARIANTS["base"], 0, epochs, work)
    for task in range(3):
        base.train_task(stream[task]["train"], stream.task_classes[task])
    learners = {name: fork(base, VARIANTS[name], f"{work}/fork") for name in ("base", "tree_ot")}
    batch = DefaultDataCollator()(
        [
            {k: row[k] for k in ("pixel_values", "labels")}
            for row in stream[3]["train"].select(range(32))
        ]
    )
    steps = {}
    for name, learner in learners.items():
        learner._begin_task(stream[3]["train"], stream.task_classes[3])
        step = trainer_step_fn(learner, num_training_steps=10_000)
        steps[name] = lambda step=step: step(dict(batch))
    timing = compare(steps["base"], {"tree_ot": steps["tree_ot"]}, warmup=5, repeats=repeats)
    return float(timing["ratios"]["tree_ot"])


def wide_setting():
    """A wider random ViT (timing only) on 32x32 digits."""
    data = load_digits(0, validation_size=0.3, image_size=32)
    backbone = tiny_vit_classifier(
        image_size=32,
        patch_size=4,
        hidden_size=192,
        num_layers=6,
        num_attention_heads=6,
        intermediate_size=768,
        seed=0,
    )
    stream = class_incremental_stream(
        DatasetDict(train=data["train"], test=data["test"]), 5, seed=0
    )
    return backbone, stream


def main(argv: list[str] | None = None) -> BenchmarkReport:
    parser = make_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, no files")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--epochs", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=100)
    options = parser.parse_args(argv)
    if options.quick:
        options.seeds, options.epochs, options.repeats = [0], 1.0, 3
    datasets.disable_progress_bars()
    start = time.perf_counter()
    runs: dict[str, dict[int, dict]] = {name: {} for name in VARIANTS}
    cosines: dict[str, list[float]] = {"base": [], "tree_ot": []}
    rescored: dict[int, float] = {}
    with torch_threads(1), tempfile.TemporaryDirectory() as work:
        for seed in options.seeds:
            backbone, stream = setting(seed)
            for name, variant in VARIANTS.items():
                trainer = make_trainer(backbone, variant, seed, options.epochs, work)
                runs[name][seed] = trainer.fit_stream(stream)
                print(f"seed {seed} {name}: FAA {runs[name][seed]['faa']:.4f}", flush=True)
                if name == "tree_ot":
                    rescored[seed] = final_accuracy_rescored(trainer, stream)
            for name, values in mechanism(backbone, stream, seed, options.epochs, work).items():
                cosines[name].extend(values)
        backbone, stream = setting(0)
        tiny_ratio = step_overhead(backbone, stream, options.epochs, work, options.repeats)
        wide_ratio = step_overhead(*wide_setting(), min(options.epochs, 1.0), work, options.repeats)

    metrics: dict[str, dict] = {}
    for name, per_seed in runs.items():
        faa = [per_seed[s]["faa"] for s in options.seeds]
        forgetting = [per_seed[s]["forgetting"] for s in options.seeds]
        stage = np.array(
            [
                [np.nanmean(row) for row in np.array(per_seed[s]["accuracy_matrix"])]
                for s in options.seeds
            ]
        )
        metrics[name] = {
            "faa": mean_std(faa)[0],
            "faa_std": mean_std(faa)[1],
            "forgetting": mean_std(forgetting)[0],
            "faa_per_seed": faa,
            "forgetting_per_seed": forgetting,
            "stage_average_accuracy": stage.mean(0).tolist(),
            "tii_accuracy_final": float(
                np.mean([per_seed[s]["tii_accuracy"][-1] for s in options.seeds])
            ),
            "accuracy_matrix_seed0": per_seed[options.seeds[0]]["accuracy_matrix"],
        }
    wins = {
        name: int(sum(runs[name][s]["faa"] >= runs["base"][s]["faa"] for s in options.seeds))
        for name in ("tree", "tree_ot", "tree_ot_paper_weights")
    }
    metrics["tree_ot_eval_rescoring"] = {
        "faa": float(np.mean([rescored[s] for s in options.seeds])),
        "faa_per_seed": [rescored[s] for s in options.seeds],
    }
    metrics["mechanism"] = {
        "same_group_cosine_base": float(np.nanmean(cosines["base"])),
        "same_group_cosine_tree_ot": float(np.nanmean(cosines["tree_ot"])),
        "per_task_base": cosines["base"],
        "per_task_tree_ot": cosines["tree_ot"],
    }
    metrics["seeds_tree_ge_base"] = wins
    report = BenchmarkReport(
        name=NAME,
        metrics=metrics,
        ratios={"ot_supcon_step": tiny_ratio, "ot_supcon_step_wide_vit": wide_ratio},
        config={
            "seeds": options.seeds,
            "epochs_per_task": options.epochs,
            "variants": VARIANTS,
            "prompt": PROMPT,
            "learning_rate": 0.03,
            "batch_size": 32,
            "backbone": "tiny ViT 4x32 trained on 30% of digits (upstream stand-in)",
            "quick": options.quick,
            "total_seconds": time.perf_counter() - start,
        },
        notes=(
            "FAA = mean accuracy over the 5 tasks after the last; forgetting (Chaudhry et al.). "
            "Weights fixed before the runs (official script); no tuning on test. Mechanism: task "
            "t learned from the base state after t-1 with/without the hierarchical terms. Step "
            "ratios: medians of interleaved samples on a shared 2-core CPU."
        ),
    )
    if not options.quick:
        report.write(options.results_dir)
        plot(metrics, options.results_dir)
    report.print_table()
    return report


def plot(metrics: dict, results_dir) -> Path:
    plt = get_pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name in VARIANTS:
        values = metrics[name]["stage_average_accuracy"]
        ax.plot(
            range(1, len(values) + 1),
            values,
            marker="o",
            label=f"{name} (FAA {metrics[name]['faa']:.3f})",
        )
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("average accuracy on seen tasks")
    ax.set_title("Digits, 5 tasks x 2 classes (mean of seeds)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_plot(fig, NAME, results_dir)


if __name__ == "__main__":
    main()

"""The training runs of tests/test_resume_exact.py, in this process or as a script.

python tests/scripts/resume_run.py [--resume] [--stall FOLDER] CASE OUTPUT_DIR RESULT [...]

CASE is one of :data:`CASES` (several CASE OUTPUT_DIR RESULT triples run one after the other). ``--resume`` resumes from the newest complete checkpoint
(``resume_from_checkpoint=True`` / ``"last"``). ``--stall FOLDER`` (e.g. ``checkpoint-4``,
``task-1/checkpoint-4``): in the middle of writing that checkpoint (after the model, before
Trainer's optimizer, RNG and trainer_state.json; for the erasure, inside its uncommitted
staging area) the run writes ``OUTPUT_DIR.stalled`` and waits to be killed. The final tensors
(:func:`run`'s result) are saved to RESULT with ``torch.save``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch

CASES = ("agnostic_sam", "fhbi", "hierarchical_cl", "erasure")
COMMON = dict(
    report_to=[],
    use_cpu=True,
    logging_strategy="no",
    disable_tqdm=True,
    seed=0,
    save_strategy="steps",
    save_steps=2,
)


def stall_marker(output_dir: str | os.PathLike) -> Path:
    return Path(f"{output_dir}.stalled")


def _stall(output_dir, folder) -> None:
    stall_marker(output_dir).write_text(str(folder))
    while True:  # killed here by the test
        time.sleep(1)


def _instrument(trainer, output_dir, stall) -> list[int]:
    """Count ``trainer``'s training steps (the returned one-item list); make its
    ``save_model`` of checkpoint folder ``stall`` stop the run right after it."""
    steps = [0]
    training_step = trainer.training_step

    def counted(*args, **kwargs):
        steps[0] += 1
        return training_step(*args, **kwargs)

    trainer.training_step = counted
    if stall is None:
        return steps
    save_model = trainer.save_model

    def save_then_stall(folder=None, _internal_call=False):
        save_model(folder, _internal_call)
        if folder is not None and Path(folder) == Path(output_dir) / stall:
            _stall(output_dir, folder)

    trainer.save_model = save_then_stall
    return steps


def _digits(rows: int):
    from hf_extensions.data import load_digits

    split = load_digits(0)["train"].select(range(rows))
    return split.select_columns(["pixel_values", "labels"])


def agnostic_sam(output_dir: str, resume: bool, stall: str | None) -> dict[str, torch.Tensor]:
    """Agnostic-SAM (a perturbation trainer) on a tiny ViT, AdamW, 6 steps."""
    from hf_extensions.models import tiny_vit_classifier
    from trainers import AgnosticSAMConfig, AgnosticSAMTrainer

    args = AgnosticSAMConfig(
        output_dir=output_dir, max_steps=6, per_device_train_batch_size=8, optim="adamw_torch",
        learning_rate=1e-2, rho_train=0.05, rho_val=0.05, **COMMON,
    )  # fmt: skip
    trainer = AgnosticSAMTrainer(
        model=tiny_vit_classifier(seed=0), args=args, train_dataset=_digits(48)
    )
    steps = _instrument(trainer, output_dir, stall)
    trainer.train(resume_from_checkpoint=True if resume else None)
    tensors = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return {**tensors, "steps_run": torch.tensor(steps[0])}


def fhbi(output_dir: str, resume: bool, stall: str | None) -> dict[str, torch.Tensor]:
    """FHBI with 2 LoRA particles on a tiny ViT, SGD with momentum, 6 steps."""
    from peft import LoraConfig, get_peft_model

    from hf_extensions.fhbi.particles import ParticleEnsemble
    from hf_extensions.models import tiny_vit_classifier
    from trainers.fhbi_config import FHBIConfig
    from trainers.fhbi_trainer import FHBITrainer

    lora = LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]
    )
    torch.manual_seed(0)  # LoRA A is drawn from the global generator
    ensemble = ParticleEnsemble(get_peft_model(tiny_vit_classifier(seed=0), lora), num_particles=2)
    args = FHBIConfig(
        output_dir=output_dir, max_steps=6, per_device_train_batch_size=8, optim="sgd",
        optim_args="momentum=0.9", learning_rate=0.1, num_particles=2, **COMMON,
    )  # fmt: skip
    trainer = FHBITrainer(model=ensemble, args=args, train_dataset=_digits(32))
    steps = _instrument(trainer, output_dir, stall)
    trainer.train(resume_from_checkpoint=True if resume else None)
    tensors = {f"particles.{i}": p.detach().clone() for i, p in enumerate(ensemble.particles)}
    tensors.update({n: p.detach().clone() for n, p in ensemble.named_parameters()})
    return {**tensors, "steps_run": torch.tensor(steps[0])}


def hierarchical_cl_trainer(output_dir: str, **overrides):
    """The trainer and stream of the hierarchical-CL case: 3 tasks of 2 digits, 2 epochs of 4
    steps each, a checkpoint every 3 steps."""
    from datasets import DatasetDict
    from peft import get_peft_model
    from transformers import DefaultDataCollator

    import peft_configs  # noqa: F401  (registers the prompt pool)
    from hf_extensions.data import class_incremental_stream, load_digits
    from hf_extensions.hierarchical_cl.taxonomy import LabelTree
    from hf_extensions.models import tiny_vit_classifier
    from peft_configs.prompt_pool import PromptPoolConfig
    from trainers import HierarchicalPromptCLConfig, HierarchicalPromptCLTrainer

    data = load_digits(0)
    small = DatasetDict(train=data["train"].select(range(150)), test=data["test"].select(range(60)))
    stream = class_incremental_stream(
        small, num_tasks=3, classes_per_task=2, class_order=[0, 8, 1, 7, 3, 6]
    )
    torch.manual_seed(0)  # the prompts are drawn from the global generator
    pool = PromptPoolConfig(
        pool_size=3, top_k=1, layers=[0, 1], prompt_length=3, key_source="fixed",
        modules_to_save=["classifier"],
    )  # fmt: skip
    model = get_peft_model(tiny_vit_classifier(num_layers=2, seed=0), pool)
    settings = dict(
        output_dir=output_dir, per_device_train_batch_size=8, num_train_epochs=2,
        learning_rate=0.03, num_components=3, ot_samples=40, ca_epochs=2, tii_epochs=3,
        replay_factor=2, reg_glob=0.05, reg_sub=0.1, **{**COMMON, "save_steps": 3},
    )  # fmt: skip
    tree = {"round": ["0", "6", "8", "9"], "straight": ["1", "4", "7"], "curvy": ["2", "3", "5"]}
    trainer = HierarchicalPromptCLTrainer(
        model,
        HierarchicalPromptCLConfig(**{**settings, **overrides}),
        taxonomy=LabelTree(tree),
        data_collator=DefaultDataCollator(),
    )
    return trainer, stream


def continual_tensors(trainer) -> dict[str, torch.Tensor]:
    """The model's tensors, the TII head and the class mixtures of a hierarchical-CL trainer."""
    tensors = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    tensors["tii.weight"] = trainer.tii_head.weight.detach().clone()
    tensors["tii.bias"] = trainer.tii_head.bias.detach().clone()
    for space in ("frozen", "prompted"):
        for c, m in getattr(trainer, f"{space}_mixtures").items():
            for name in ("means", "variances", "weights"):
                tensors[f"{space}.{c}.{name}"] = getattr(m, name).clone()
    tensors["task_classes"] = torch.tensor(trainer.task_classes)
    return tensors


def hierarchical_cl(output_dir: str, resume: bool, stall: str | None) -> dict[str, torch.Tensor]:
    """The whole stream; the tensors of the model, the continual state and the results."""
    trainer, stream = hierarchical_cl_trainer(output_dir)
    steps = _instrument(trainer, output_dir, stall)
    result = trainer.fit_stream(stream, resume_from_checkpoint=True if resume else None)
    tensors = continual_tensors(trainer)
    tensors["accuracy_matrix"] = torch.tensor(result["accuracy_matrix"], dtype=torch.float64)
    tensors["tii_accuracy"] = torch.tensor(result["tii_accuracy"], dtype=torch.float64)
    return {**tensors, "steps_run": torch.tensor(steps[0])}


def erasure(output_dir: str, resume: bool, stall: str | None) -> dict[str, torch.Tensor]:
    """EAP on the tiny Stable Diffusion pipeline, 2 cycles per step, 6 steps."""
    from hf_extensions.models import tiny_stable_diffusion_pipeline
    from hf_extensions.pipelines import ConceptEraser, ErasureConfig, erase_concepts
    from hf_extensions.pipelines import erasure_checkpoints as checkpoints

    steps = [0]
    step, write = ConceptEraser.step, checkpoints._write_checkpoint

    def counted(eraser):
        steps[0] += 1
        return step(eraser)

    def write_then_stall(eraser, folder):
        write(eraser, folder)
        if folder.name == stall:
            _stall(output_dir, folder)

    config = ErasureConfig(
        num_steps=6, learning_rate=1e-2, ddim_steps=3, progress_bar=False, k_closest=8,
        num_centers=4, gradient_accumulation_steps=2, pgd_num_steps=2,
        candidates=["dog", "cat", "tree", "house", "car", "boat", "apple", "river"],
        save_steps=2, checkpoint_dir=output_dir, resume_from_checkpoint="last" if resume else None,
    )  # fmt: skip
    ConceptEraser.step, checkpoints._write_checkpoint = counted, write_then_stall
    try:
        pipe = erase_concepts(tiny_stable_diffusion_pipeline(), ["a red circle"], "eap", config)
    finally:
        ConceptEraser.step, checkpoints._write_checkpoint = step, write
    tensors = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    probabilities = pipe.erasure_result.adversarial_concepts["a red circle"]["probabilities"]
    tensors["adversary"] = torch.tensor(list(probabilities.values()), dtype=torch.float64)
    tensors["losses"] = torch.tensor(pipe.erasure_result.losses, dtype=torch.float64)
    return {**tensors, "steps_run": torch.tensor(steps[0])}


def run(case: str, output_dir: str, resume: bool = False, stall: str | None = None):
    """Train ``case`` into ``output_dir``; the final tensors by name."""
    return {c: globals()[c] for c in CASES}[case](str(output_dir), resume, stall)


def main(argv: list[str]) -> int:
    """Run each ``CASE OUTPUT_DIR RESULT`` triple in turn (one process: imports are paid once);
    a failing case writes its traceback to ``RESULT.error`` and the others still run. With
    ``--stdin`` the triples are read from standard input once the libraries are imported (the
    test starts this process early, so that its imports overlap the runs it is given)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="*", help="CASE OUTPUT_DIR RESULT, repeated")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stall", default=None)
    parser.add_argument("--stdin", action="store_true", help="read the triples from stdin")
    options = parser.parse_args(argv)
    torch.set_num_threads(1)  # as tests/conftest.py: the same kernels as the in-process runs
    if options.stdin:
        import diffusers  # noqa: F401

        import peft_configs  # noqa: F401
        import trainers  # noqa: F401
        from hf_extensions import data, models, pipelines  # noqa: F401

        options.runs += sys.stdin.read().split()
    if not options.runs or len(options.runs) % 3:
        parser.error("expected CASE OUTPUT_DIR RESULT triples")
    failed = 0
    for case, output_dir, result in zip(*[iter(options.runs)] * 3):
        start = time.perf_counter()
        try:
            torch.save(run(case, output_dir, options.resume, options.stall), result)
            print(f"resume_run {case}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        except Exception:
            Path(f"{result}.error").write_text(traceback.format_exc())
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

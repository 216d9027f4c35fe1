"""Conformance case of hierarchical prompt-based continual learning
(``HierarchicalPromptCLTrainer``: one prompt of a fixed-key pool per task, on a ViT).
Baseline: the first task with the taxonomy terms and the HiDe regulariser off equals the
stock ``Trainer`` on the task's prompt with the CE masked to the task's classes; the control
turns the taxonomy term on. Reload: the adapter and the continual state, settings read back
from the card; two processes: plain CE, and the full method's replicas agree."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import DefaultDataCollator, Trainer, TrainingArguments

import peft_configs  # noqa: F401  (registers the prompt pool with PEFT)
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
    params,
    saved_trainer,
)
from hf_extensions.models import tiny_vit_classifier as vit
from peft_configs.prompt_pool import PromptPoolConfig
from trainers import HierarchicalPromptCLConfig, HierarchicalPromptCLTrainer

_CL_CLASSES = ([0, 1], [2, 3])


def _cl_task(classes, rows: int = 24) -> Dataset:
    train = digits("image", 400)
    keep = [i for i, y in enumerate(train["labels"]) if y in classes][:rows]
    return train.select(keep)


def _prompt_pool_vit(pool_size: int = 2) -> PeftModel:
    torch.manual_seed(0)  # the prompts are drawn from the global generator
    return get_peft_model(
        vit(),
        PromptPoolConfig(
            pool_size=pool_size,
            top_k=1,
            layers=[0, 1],
            prompt_length=2,
            key_source="fixed",
            modules_to_save=["classifier"],
        ),
    )


class _MaskedTaskCE(nn.Module):
    """The stock objective of a prompt-per-task learner: the task's prompt, CE over its classes."""

    def __init__(self, model: PeftModel, classes, task: int = 0):
        super().__init__()
        self.model, self.task = model, task
        mask = torch.zeros(10, dtype=torch.bool)
        mask[classes] = True
        self.register_buffer("mask", mask)

    def forward(self, pixel_values, labels):
        logits = self.model(pixel_values=pixel_values, prompt_ids=self.task).logits
        logits = logits.masked_fill(~self.mask, float("-inf"))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


_CL_FAST = dict(use_ot=False, tii_epochs=1, ca_epochs=1, num_components=1, ca_samples_per_class=8)


def _cl_trainer(model, output_dir, **settings) -> HierarchicalPromptCLTrainer:
    config = HierarchicalPromptCLConfig(
        output_dir=str(output_dir), **{**QUIET, **REAL_STEP, **_CL_FAST, **settings}
    )
    return HierarchicalPromptCLTrainer(model, config, data_collator=DefaultDataCollator())


def _cl_baseline(tmp_path: Path) -> Baseline:
    """The first task with the taxonomy terms and the HiDe regulariser off is the stock
    ``Trainer`` on the task's prompt with the CE masked to the task's classes."""
    data = _cl_task(_CL_CLASSES[0])
    stock = _prompt_pool_vit()
    args = TrainingArguments(str(tmp_path / "stock"), **QUIET, **REAL_STEP)
    trainer = Trainer(
        model=_MaskedTaskCE(stock, _CL_CLASSES[0]),
        args=args,
        train_dataset=data,
        data_collator=DefaultDataCollator(),
    )
    torch.manual_seed(0)
    trainer.train()
    result = Baseline({}, params(stock), {}, params(_prompt_pool_vit()))
    for name, settings in (
        ("method", dict(hierarchical=False, hide_reg=0.0)),
        ("control", dict(hierarchical=True, reg_glob=0.5, hide_reg=0.0)),
    ):
        model = _prompt_pool_vit()
        learner = _cl_trainer(model, tmp_path / name, **settings)
        torch.manual_seed(0)
        learner.train_task(data, _CL_CLASSES[0])
        setattr(result, name, params(model))
    return result


CL_CARD = {
    "reg_glob": 0.07,
    "reg_sub": 0.2,
    "hide_reg": 0.3,
    "supcon_temperature": 0.2,
    "eval_rescoring": True,
    "rescoring_eta": 0.05,
    "rescoring_eta0": 0.5,
}


def _cl_outputs(learner: HierarchicalPromptCLTrainer):
    """Every task prompt's logits, the TII head, and the learner's class and task predictions
    (with the re-scoring on)."""
    model = learner.accelerator.unwrap_model(learner.model).eval()
    probe = _cl_task([0, 1, 2, 3], rows=12)
    pixels = torch.as_tensor(probe["pixel_values"])
    outputs = {}
    with torch.no_grad():
        for task in range(len(learner.task_classes)):
            outputs[f"task{task}/logits"] = model(pixel_values=pixels, prompt_ids=task).logits
        outputs["tii.weight"] = learner.tii_head.weight.detach().clone()
    predicted = learner.predict_classes(probe)
    for key in ("predictions", "task_predictions"):
        outputs[key] = torch.as_tensor(predicted[key])
    return outputs


def _cl_save(directory: Path) -> Saved:
    learner = _cl_trainer(_prompt_pool_vit(), directory, max_steps=2, **CL_CARD)
    torch.manual_seed(0)
    for classes in _CL_CLASSES:
        learner.train_task(_cl_task(classes), classes)
    outputs = _cl_outputs(learner)
    return saved_trainer(learner, directory, outputs)


def _cl_reload(directory: Path):
    from hf_extensions.hub import read_model_card_metadata

    recorded = read_model_card_metadata(directory)["hyperparameters"]
    settings = {n: recorded[n] for n in HierarchicalPromptCLConfig.method_fields}
    model = PeftModel.from_pretrained(vit(), str(directory))
    config = HierarchicalPromptCLConfig(output_dir=str(directory / "reloaded"), **settings)
    learner = HierarchicalPromptCLTrainer(model, config, data_collator=DefaultDataCollator())
    learner.load_continual_state(directory)
    return _cl_outputs(learner)


def _cl_ranks(output_dir: str, variant: str):
    """A 2-task stream. Plain CE (the per-rank terms off): 2 x 8 == 1 x 16 for the prompts, the
    head, the TII head and the class means. ``replicas``: the full method on 2 processes
    (replay and SupCon are drawn per rank): every rank ends with the same state."""
    plain = variant != "replicas"
    model = _prompt_pool_vit()
    initial = params(model)
    learner = _cl_trainer(
        model,
        output_dir,
        per_device_train_batch_size={"two": 8, "one": 16, "replicas": 8}[variant],
        **{**DDP_STEP, "learning_rate": 0.1},
        **(dict(hierarchical=False, hide_reg=0.0) if plain else dict(reg_glob=0.5, hide_reg=0.3)),
    )
    torch.manual_seed(0)
    for classes in _CL_CLASSES:
        learner.train_task(_cl_task(classes, rows=32), classes)
    final = {**params(model), "tii.weight": learner.tii_head.weight.detach()}
    for c, mixture in learner.prompted_mixtures.items():
        final[f"prompted.{c}.means"] = mixture.means
    return {"steps": learner.state.global_step}, initial, final


HIERARCHICAL_CL = Case(
    id="hierarchical-cl",
    baseline=_cl_baseline,
    save=_cl_save,
    reload=_cl_reload,
    card=CardSpec(
        "hierarchical-prompt-cl",
        "Leveraging Hierarchical Taxonomies in Prompt-based Continual Learning",
        "2410.04327",
        "transformers",
        HierarchicalPromptCLConfig,
        CL_CARD,
    ),
    bad_configs=bad_values(
        HierarchicalPromptCLConfig,
        TRAINING,
        [
            ("reg_glob", -1.0),
            ("rescoring_eta", float("nan")),
            ("ot_delta", 0.0),
            ("ot_solver", "sliced"),
            ("num_components", 0),
            ("replay_factor", -1),
            ("num_groups", 0),
            ("head_name", ""),
        ],
    ),
    ranks=Ranks(_cl_ranks, has_replicas=True),
)

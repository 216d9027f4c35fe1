"""Conformance case of PromptDSI (``PromptDSITrainer``: a tiny BERT DSI whose encoder wears a
prompt pool, grown by an increment of new documents). Baseline: ``auxiliary_loss_weight=0``
equals the stock ``Trainer`` on the grown DSI, only the prompts and the new rows trainable;
the control turns the pool's pull loss on. Reload: the DSI with its pool; two processes: fixed
topic keys (the L2P setting, learned keys + pull loss, fails under DDP and is not fixed)."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from peft import get_peft_model
from torch import nn
from transformers import Trainer, TrainingArguments, default_data_collator

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
    bad,
    bad_values,
    params,
)
from hf_extensions.models import tiny_bert_classifier
from hf_extensions.prompt_dsi.dsi import DSIModel
from peft_configs.prompt_pool import PromptPoolConfig, query_features, topic_keys
from trainers import PromptDSIConfig, PromptDSITrainer

_NUM_D0, _NUM_NEW = 4, 6


def _dsi_increment() -> Dataset:
    ids = torch.randint(5, 500, (24, 6), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
            "labels": (torch.arange(24) % _NUM_NEW + _NUM_D0).tolist(),
        }
    )


def _dsi_model(key_source: str = "learned") -> DSIModel:
    """A tiny BERT DSI of ``_NUM_D0`` documents whose encoder wears a prompt pool: learned keys
    with L2P's pull loss, or PromptDSI's fixed topic keys (k-means of the increment's queries)."""
    torch.manual_seed(0)
    model = DSIModel(tiny_bert_classifier().bert, _NUM_D0)
    pull = 0.1 if key_source == "learned" else 0.0
    config = PromptPoolConfig(
        pool_size=3, prompt_length=2, layers=[0, 1], key_source=key_source, pull_loss_weight=pull
    )
    model.encoder = get_peft_model(model.encoder, config)
    if key_source == "fixed":
        tokens = _dsi_increment()[:]
        features = query_features(
            tiny_bert_classifier().bert,
            input_ids=torch.tensor(tokens["input_ids"]),
            attention_mask=torch.tensor(tokens["attention_mask"]),
        )
        model.encoder.base_model.set_keys(topic_keys(features, num_topics=3, seed=0)[0])
    return model


def _dsi_baseline(tmp_path: Path) -> Baseline:
    """An increment with ``auxiliary_loss_weight=0``: the stock ``Trainer`` on the grown DSI,
    only the prompts and the new rows trainable. Control: the pool's pull loss on."""
    data = _dsi_increment()
    stock = _dsi_model()
    stock.accepts_loss_kwargs = False
    args = TrainingArguments(str(tmp_path / "stock"), **QUIET, **REAL_STEP)
    trainer = Trainer(
        model=stock, args=args, train_dataset=data, data_collator=default_data_collator
    )
    torch.manual_seed(1)
    stock.add_documents(_NUM_NEW)
    stock.set_trainable(encoder=False, old_rows=False)
    trainer.train()
    result = Baseline({}, stock.state_dict(), {}, None)
    for name, weight in (("method", 0.0), ("control", 1.0)):
        model = _dsi_model()
        config = PromptDSIConfig(
            output_dir=str(tmp_path / name), auxiliary_loss_weight=weight, **QUIET, **REAL_STEP
        )
        learner = PromptDSITrainer(model, config, data_collator=default_data_collator)
        torch.manual_seed(1)
        learner.add_documents(data, _NUM_NEW)
        setattr(result, name, model.state_dict())
    start = _dsi_model()
    torch.manual_seed(1)
    start.add_documents(_NUM_NEW)
    result.initial = start.state_dict()
    return result


DSI_CARD = {"strategy": "l2p", "auxiliary_loss_weight": 0.5, "rows_learning_rate": 0.05}


def _dsi_outputs(model: DSIModel):
    ids = torch.randint(5, 500, (5, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return {"logits": model.eval()(ids, torch.ones_like(ids)).logits}


def _dsi_save(directory: Path) -> Saved:
    model = _dsi_model()
    config = PromptDSIConfig(
        output_dir=str(directory), **{**QUIET, **REAL_STEP, "max_steps": 2, **DSI_CARD}
    )
    learner = PromptDSITrainer(model, config, data_collator=default_data_collator)
    learner.add_documents(_dsi_increment(), _NUM_NEW)
    model.save_pretrained(directory)
    learner.create_model_card()
    return Saved(_dsi_outputs(model), {n: getattr(config, n) for n in config.method_fields})


def _dsi_reload(directory: Path):
    return _dsi_outputs(DSIModel.from_pretrained(directory, tiny_bert_classifier().bert))


def _dsi_ranks(output_dir: str, variant: str):
    """One PromptDSI increment with fixed topic keys (one trainer per increment under DDP):
    2 x 4 == 1 x 8, 3 steps: one epoch of the 24 rows (a last global batch shorter than the
    others would be padded with repeated rows on 2 processes). BERT's dropout is off: each
    process draws its own masks. (Learned keys with the pull loss fail under DDP: the loss
    reads the keys outside the forward pass.)"""
    model = _dsi_model("fixed")
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    initial = params(model)
    config = PromptDSIConfig(
        output_dir=output_dir,
        per_device_train_batch_size={"two": 4, "one": 8}[variant],
        rows_learning_rate=0.5,
        **{**QUIET, **DDP_STEP, "learning_rate": 20.0},
    )
    learner = PromptDSITrainer(model, config, data_collator=default_data_collator)
    torch.manual_seed(1)  # the new rows are drawn from the global generator
    learner.add_documents(_dsi_increment(), _NUM_NEW)
    return {"steps": learner.state.global_step}, initial, params(model)


PROMPT_DSI = Case(
    id="prompt-dsi",
    baseline=_dsi_baseline,
    save=_dsi_save,
    reload=_dsi_reload,
    card=CardSpec(
        "prompt-dsi",
        "PromptDSI: Prompt-based Rehearsal-free Instance-wise Incremental Learning for "
        "Document Retrieval",
        "2406.12593",
        "transformers",
        PromptDSIConfig,
        DSI_CARD,
    ),
    bad_configs=(
        *bad_values(
            PromptDSIConfig,
            TRAINING,
            [("strategy", "replay"), ("auxiliary_loss_weight", -1.0), ("rows_learning_rate", 0.0)],
        ),
        bad(
            "train_encoder",
            lambda: PromptDSIConfig(**TRAINING, strategy="prompt_dsi", train_encoder=True),
            True,
        ),
    ),
    ranks=Ranks(_dsi_ranks),
)

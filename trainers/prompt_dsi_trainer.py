"""Incremental indexing of a classification DSI with ``Trainer``: PromptDSI and its baselines.

Huynh et al., "PromptDSI: Prompt-based Rehearsal-free Instance-wise Incremental Learning for
Document Retrieval" (arXiv 2406.12593). The model is a :class:`hf_extensions.prompt_dsi.dsi.DSIModel`
(encoder -> pooled feature -> docid rows); for PromptDSI / L2P its encoder is a
``get_peft_model(encoder, PromptPoolConfig(...))`` prompt pool, whose base weights PEFT freezes.
:meth:`PromptDSITrainer.add_documents` is one indexing step: it appends docid rows for the new
documents, sets what trains according to :class:`trainers.PromptDSIConfig` (``strategy``), and
runs the stock training loop (a fresh optimizer per increment: the new rows are new parameters)
on the new documents (or on everything seen so far for ``joint``).

The loss (:meth:`compute_loss`) is the DSI cross-entropy from text / pseudo-query to docid over
*all* rows seen so far, plus the pool's ``auxiliary_loss()`` (the L2P pull loss for learned keys;
zero for PromptDSI's fixed topic keys), weighted by ``auxiliary_loss_weight``.

Departures from the paper's T5 code: a classification (atomic-docid) DSI with a BERT-family
encoder instead of T5 generation of docids (the PromptDSI paper's IncDSI comparison uses the
same classification form); one optimizer per increment (AdamW, the Trainer's). Distributed
runs: the docid head grows between ``train()`` calls, so under DDP build one trainer per
increment (the model is re-wrapped) rather than reusing one across increments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from datasets import Dataset, concatenate_datasets
from peft import PeftModel

from hf_extensions.metrics import hits_at_k, mrr_at_k, rank_from_scores
from hf_extensions.prompt_dsi.dsi import DSIModel
from trainers.method_trainer import MethodTrainer
from trainers.prompt_dsi_config import PromptDSIConfig

__all__ = ["PromptDSITrainer", "evaluate_retrieval", "prompt_pool_of", "tokenize_for_dsi"]


def prompt_pool_of(model: DSIModel):
    """The ``PromptPoolModel`` (PEFT tuner) around ``model``'s encoder, or ``None``."""
    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, PeftModel):
        return encoder.base_model
    return None


def tokenize_for_dsi(dataset: Dataset, tokenizer, max_length: int = 64) -> Dataset:
    """Add ``input_ids`` / ``attention_mask`` (truncated, unpadded) from the ``text`` column.

    The ``labels`` column (docids) stays; pad per batch with ``DataCollatorWithPadding``.
    """

    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    return dataset.map(encode, batched=True)


@torch.no_grad()
def evaluate_retrieval(
    model: DSIModel,
    dataset: Dataset,
    collator,
    *,
    batch_size: int = 128,
    ks: Sequence[int] = (1, 10),
    mrr_k: int = 10,
    num_docs: int | None = None,
) -> dict[str, float]:
    """Hits@k and MRR@k of ``model`` on a tokenized query ``dataset`` (``labels`` = docids).

    Documents are ranked over the first ``num_docs`` rows (default: all). Uses
    :func:`hf_extensions.metrics.hits_at_k` / :func:`mrr_at_k` on :func:`rank_from_scores`.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    keep = ("input_ids", "attention_mask", "token_type_ids")
    scores = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        features = [
            {key: rows[key][i] for key in keep if key in rows} for i in range(len(rows["labels"]))
        ]
        batch = {key: value.to(device) for key, value in collator(features).items()}
        batch.pop("labels", None)
        logits = model(**batch).logits
        # host: per evaluation batch (a [queries, documents] table would not fit on the device);
        # the ranking runs in numpy
        scores.append(logits[:, :num_docs].float().cpu() if num_docs else logits.float().cpu())
    model.train(was_training)
    ranked = rank_from_scores(torch.cat(scores).numpy(), max(*ks, mrr_k))  # host: see above
    labels = list(dataset["labels"])
    metrics = {f"hits@{k}": hits_at_k(ranked, labels, k) for k in ks}
    metrics[f"mrr@{mrr_k}"] = mrr_at_k(ranked, labels, mrr_k)
    return metrics


class PromptDSITrainer(MethodTrainer):
    """``Trainer`` for incremental indexing: :meth:`add_documents` per increment.

    Example::

        pool = get_peft_model(encoder, PromptPoolConfig(key_source="fixed", ...))
        pool.base_model.set_keys(topic_keys(d0_query_features, num_topics=8)[0])
        model = DSIModel(pool, num_docs=len(d0_docs))   # D0 rows trained beforehand
        trainer = PromptDSITrainer(model, PromptDSIConfig(output_dir="out"),
                                   data_collator=DataCollatorWithPadding(tokenizer))
        for increment in increments:           # tokenized text/queries -> docid
            trainer.add_documents(increment, num_new_docs=60)
    """

    method: ClassVar[str] = "prompt-dsi"
    paper: ClassVar[str | None] = (
        "PromptDSI: Prompt-based Rehearsal-free Instance-wise Incremental Learning for "
        "Document Retrieval"
    )
    arxiv_id: ClassVar[str | None] = "2406.12593"

    def __init__(self, model: DSIModel, args: PromptDSIConfig, *trainer_args, **kwargs):
        if not isinstance(args, PromptDSIConfig):
            raise TypeError(f"`args` must be a PromptDSIConfig, got {type(args).__name__}.")
        if not isinstance(model, DSIModel):
            raise TypeError(
                f"`model` must be a hf_extensions.prompt_dsi.dsi.DSIModel, got {type(model)}."
            )
        has_pool = prompt_pool_of(model) is not None
        if args.uses_pool and not has_pool:
            raise ValueError(
                f"`strategy`={args.strategy!r} needs the DSI encoder wrapped in a prompt pool: "
                "DSIModel(get_peft_model(encoder, PromptPoolConfig(...)), ...)."
            )
        if not args.uses_pool and has_pool:
            raise ValueError(
                f"`strategy`={args.strategy!r} fine-tunes a plain encoder, but the DSI encoder is "
                "a PEFT model; use 'prompt_dsi' or 'l2p'."
            )
        model.accepts_loss_kwargs = False  # the CE is a batch mean: Trainer scales accumulation
        super().__init__(model, args, *trainer_args, **kwargs)
        self.seen_datasets: list[Dataset] = []
        if self.train_dataset is not None:
            self.seen_datasets.append(self.train_dataset)

    @property
    def prompt_pool(self):
        return prompt_pool_of(self.model)

    def create_optimizer(self, model=None):
        """The stock optimizer, with the docid rows in their own group at ``rows_learning_rate``."""
        rows_lr = self.args.rows_learning_rate
        if self.optimizer is not None or rows_lr is None:
            return super().create_optimizer(model)
        rows = [p for p in self.model.docid_blocks if p.requires_grad]
        row_ids = {id(p) for p in rows}
        others = [p for p in self.model.parameters() if p.requires_grad and id(p) not in row_ids]
        decay = self.args.weight_decay
        groups = [{"params": others, "weight_decay": decay}] if others else []
        if rows:
            groups.append({"params": rows, "lr": rows_lr, "weight_decay": decay})
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """DSI cross-entropy over all docid rows, plus the pool's auxiliary (pull) loss."""
        outputs = model(**inputs)
        loss = outputs.loss
        pool = self.prompt_pool
        if pool is not None and self.args.auxiliary_loss_weight > 0:
            auxiliary = pool.auxiliary_loss()
            if torch.is_tensor(auxiliary) and auxiliary.requires_grad:
                loss = loss + self.args.auxiliary_loss_weight * auxiliary
            self.record(dsi_loss=outputs.loss.detach(), auxiliary_loss=auxiliary)
        return (loss, outputs) if return_outputs else loss

    def add_documents(
        self, train_dataset: Dataset, num_new_docs: int, rows: torch.Tensor | None = None
    ) -> range:
        """Index ``num_new_docs`` new documents: grow the head, then train on ``train_dataset``.

        ``train_dataset`` holds the tokenized texts / pseudo-queries of the new documents with
        their docids (``labels`` in the new range, i.e. after the current rows). With
        ``num_new_docs=0`` no row is added (e.g. to train D0's rows). Returns the new docids.
        """
        model: DSIModel = self.model
        ids = range(model.num_docs, model.num_docs)
        if num_new_docs > 0:
            ids = model.add_documents(num_new_docs, rows=rows)
        labels = torch.as_tensor(train_dataset["labels"])  # host: checking the data set, once
        if len(labels) and int(labels.max()) >= model.num_docs:
            raise ValueError(
                f"`train_dataset` has docid {int(labels.max())} but the index has "
                f"{model.num_docs} rows."
            )
        self.seen_datasets.append(train_dataset)
        data = (
            concatenate_datasets(self.seen_datasets)
            if self.args.strategy == "joint"
            else train_dataset
        )
        model.set_trainable(
            encoder=bool(self.args.train_encoder), old_rows=bool(self.args.train_old_rows)
        )
        self.train_dataset = data
        self.optimizer = None  # new parameters (rows) each increment: a fresh optimizer
        self.lr_scheduler = None
        self.model_wrapped = self.model
        self.train()
        return ids

    def card_hyperparameters(self) -> dict[str, Any]:
        values = super().card_hyperparameters()
        pool = self.prompt_pool
        if pool is not None:
            config = next(iter(self.model.encoder.peft_config.values()))
            for name in ("pool_size", "prompt_length", "top_k", "layers", "key_source"):
                values[f"pool_{name}"] = getattr(config, name, None)
            values["query_source"] = getattr(config, "query_source", None)
        values["num_docs"] = self.model.num_docs
        return values

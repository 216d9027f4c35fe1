"""Class-incremental prompt learning with a label taxonomy and optimal transport.

Tran et al., "Leveraging Hierarchical Taxonomies in Prompt-based Continual Learning" (arXiv
2410.04327; official code tranquyenbk173/HierC) on the HiDe-Prompt learner (Wang et al.,
"Hierarchical Decomposition of Prompt-Based Continual Learning", NeurIPS 2023). The model is a
classification model (e.g. ``ViTForImageClassification``) wrapped in a task-indexed prompt pool,
``get_peft_model(model, PromptPoolConfig(pool_size=num_tasks, top_k=1, layers=[0..4],
modules_to_save=["classifier"]))``; PEFT freezes the backbone.

:meth:`HierarchicalPromptCLTrainer.train_task` learns one task of a stream:

1. at the start, the frozen (prompt-free) features of the new classes are summarised as k-means
   mixtures; the OT distances ``W`` between all seen classes are updated (cached per pair) and
   the taxonomy's leaf groups are restricted to the seen classes (the tree grows);
2. prompt ``t`` starts from prompt ``t − 1`` and trains with the loss of
   :class:`trainers.HierarchicalPromptCLConfig` (CE masked to the task's classes, HiDe's
   regulariser, the global and per-group SupCon terms over current + replayed pseudo-features,
   computed in one pass with an analytic backward by :class:`hf_extensions.hierarchical_cl.supcon.SupConTerms`);
3. at the end, the prompted features of the new classes are summarised as mixtures, the
   classifier is re-trained on pseudo-features of every seen class (classifier alignment) and
   the task-identity inference (TII) head on frozen features.

At test time (:meth:`predict`) the TII head on the frozen features picks a class, hence a task,
hence the prompt; the prompted forward gives the logits over all seen classes.

Departures from the official code, named: the pseudo-features replayed in the SupCon terms are
really drawn from the stored mixtures (the official ``train_task_adaptive_prediction`` assigns
``old_data`` as a local variable, so the global it means to fill stays empty and the replay is
a no-op); the TII head is a linear head trained after each task on the task's frozen features
plus pseudo-features of the earlier classes (HiDe trains it in a separate run); statistics are
computed on every process over the whole task (no all-gather), so all ranks hold the same
mixtures; the evaluation re-scoring is vectorised.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from hf_extensions.atomic import atomic_save, atomic_write_text, recover_interrupted_save
from hf_extensions.checkpoints import last_complete_checkpoint, resolve_checkpoint
from hf_extensions.data.streams import TaskStream
from hf_extensions.hierarchical_cl.supcon import SupConTerms
from hf_extensions.hierarchical_cl.taxonomy import (
    ClassDistances,
    ClassMixture,
    LabelTree,
    fit_class_mixture,
)
from hf_extensions.loading import FIX, check_tensors, read_json, read_tensors
from hf_extensions.metrics.functional import average_forgetting, final_average_accuracy
from hf_extensions.seeding import keyed_generator
from trainers.hierarchical_cl_config import HierarchicalPromptCLConfig
from trainers.method_trainer import MethodTrainer

__all__ = ["HierarchicalPromptCLTrainer", "hide_regulariser", "same_group_cosine"]

STATE_FILE = "continual_state.safetensors"
REPLAY_CHUNK = 16  # training steps whose pseudo-features are drawn at once
STATE_CONFIG = "continual_state.json"
#: In a checkpoint of a task in progress: which task, and the stream's results so far.
PROGRESS_FILE = "continual_progress.json"
TASK_DIR = "task-{}"  # the checkpoints of task t go to output_dir/task-t/checkpoint-N


def hide_regulariser(
    features: torch.Tensor, old_centroids: torch.Tensor | None, temperature: float = 0.8
) -> torch.Tensor:
    """HiDe-Prompt's contrastive regulariser (the official ``orth_loss``).

    ``M = [old centroids; features]``, ``S = M Mᵀ / τ``, loss = ``CE(S, identity)``: each
    current feature is pushed away from the other features of the batch and from every stored
    centroid of the earlier classes (raw, unnormalised features, as in the official code).
    """
    rows = features if old_centroids is None else torch.cat([old_centroids.to(features), features])
    similarity = rows @ rows.T / temperature
    return F.cross_entropy(similarity, torch.arange(len(rows), device=rows.device))


def same_group_cosine(
    new_features: Mapping[int, torch.Tensor],
    old_means: Mapping[int, torch.Tensor],
    groups: list[list[int]],
) -> float | None:
    """Mean cosine between new-class features and the means of old classes in the same group.

    The mechanism of the paper: with the hierarchical terms, new classes move away from the
    earlier classes they are confusable with. ``None`` when no group holds both.
    """
    values = []
    for group in groups:
        old = [c for c in group if c in old_means]
        for c in group:
            if c in new_features and old:
                means = F.normalize(torch.stack([old_means[o] for o in old]), dim=1)
                feats = F.normalize(new_features[c], dim=1)
                values.append((feats @ means.T).flatten())
    if not values:
        return None
    return float(torch.cat(values).mean())


def _empty_results() -> dict[str, list]:
    """The per-task results :meth:`HierarchicalPromptCLTrainer.fit_stream` accumulates."""
    return {"accuracy_matrix": [], "tii_accuracy": [], "same_group_cosine": []}


def _mixture_mean(mixture: ClassMixture) -> torch.Tensor:
    return (mixture.weights[:, None] * mixture.means).sum(0)


class HierarchicalPromptCLTrainer(MethodTrainer):
    """``Trainer`` for class-incremental learning over a task stream (:meth:`fit_stream`).

    Example::

        pool = get_peft_model(vit, PromptPoolConfig(pool_size=5, top_k=1, layers=[0, 1, 2],
                                                    key_source="fixed",
                                                    modules_to_save=["classifier"]))
        trainer = HierarchicalPromptCLTrainer(
            pool, HierarchicalPromptCLConfig(output_dir="out"),
            taxonomy=LabelTree({"round": ["0", "6", "8", "9"], "straight": ["1", "4", "7"],
                                "curvy": ["2", "3", "5"]}))
        result = trainer.fit_stream(class_incremental_stream(load_digits(), num_tasks=5))
        result["faa"], result["forgetting"], result["accuracy_matrix"]

    Args:
        taxonomy: the label tree; ``None`` builds a one-level tree from the frozen class means by
            agglomerative clustering each time classes arrive (our addition).
    """

    method: ClassVar[str] = "hierarchical-prompt-cl"
    paper: ClassVar[str | None] = (
        "Leveraging Hierarchical Taxonomies in Prompt-based Continual Learning"
    )
    arxiv_id: ClassVar[str | None] = "2410.04327"

    def __init__(
        self,
        model: PeftModel,
        args: HierarchicalPromptCLConfig,
        *trainer_args,
        taxonomy: LabelTree | Mapping | None = None,
        **kwargs,
    ):
        if not isinstance(args, HierarchicalPromptCLConfig):
            raise TypeError(
                f"`args` must be a HierarchicalPromptCLConfig, got {type(args).__name__}."
            )
        if not isinstance(model, PeftModel) or not hasattr(model.base_model, "copy_prompt_"):
            raise ValueError(
                "`model` must be a prompt-pool PEFT model: get_peft_model(model, "
                "PromptPoolConfig(pool_size=num_tasks, top_k=1, modules_to_save=['classifier']))."
            )
        model.accepts_loss_kwargs = False  # the loss is a batch mean: Trainer scales accumulation
        super().__init__(model, args, *trainer_args, **kwargs)
        if taxonomy is not None and not isinstance(taxonomy, LabelTree):
            taxonomy = LabelTree(taxonomy)
        self.taxonomy: LabelTree | None = taxonomy
        self.num_labels = int(self._head().out_features)
        self.task_classes: list[list[int]] = []
        self.current_task: int | None = None
        self.frozen_mixtures: dict[int, ClassMixture] = {}
        self.prompted_mixtures: dict[int, ClassMixture] = {}
        self.distances = ClassDistances(
            num_samples=args.ot_samples, solver=args.ot_solver, seed=args.seed
        )
        self.eval_distances = ClassDistances(
            num_samples=args.ot_samples, solver=args.ot_solver, seed=args.seed + 1
        )
        self._gamma: torch.Tensor | None = None
        self._groups: list[list[int]] = []
        self._supcon: SupConTerms | None = None  # the two SupCon terms over this task's groups
        self._old_centroids: torch.Tensor | None = None
        self._replay_table: tuple[torch.Tensor, ...] | None = None
        self._replay_chunk: tuple | None = None  # ((chunk, block), features, classes)
        self._class_masks: dict[tuple[int, ...], torch.Tensor] = {}
        self.tii_head: nn.Linear | None = None
        self._frozen_task_features: tuple[torch.Tensor, torch.Tensor] | None = None
        self._task_in_progress = False  # task_classes[-1] is being learned, not yet recorded
        self._stream_results: dict[str, list] = _empty_results()

    # ------------------------------------------------------------------------ model plumbing
    def _pool(self):
        return self.accelerator.unwrap_model(self.model).base_model

    def _head(self) -> nn.Module:
        """The active linear head (inside PEFT's ``modules_to_save`` wrapper when there is one)."""
        base = self.accelerator.unwrap_model(self.model).get_base_model()
        head = getattr(base, self.args.head_name, None)
        if head is None:
            raise ValueError(f"the model has no attribute `{self.args.head_name}` (head_name).")
        active = getattr(head, "modules_to_save", None)
        if active is not None:
            head = active[next(iter(active))]
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"`head_name`={self.args.head_name!r} must name the model's nn.Linear head, got "
                f"{type(head).__name__}."
            )
        return head

    @contextmanager
    def _head_input(self) -> Iterator[list[torch.Tensor]]:
        """Capture the input of the head (the pooled features) during a forward."""
        base = self.accelerator.unwrap_model(self.model).get_base_model()
        captured: list[torch.Tensor] = []
        hook = getattr(base, self.args.head_name).register_forward_pre_hook(
            lambda _module, args: captured.append(args[0])
        )
        try:
            yield captured
        finally:
            hook.remove()

    def _class_mask(self, classes) -> torch.Tensor:
        """``[num_labels]`` bool mask of ``classes`` on the device, built once per class set (it
        is needed at every step)."""
        key = tuple(classes)
        if key not in self._class_masks:
            mask = torch.zeros(self.num_labels, dtype=torch.bool, device=self.args.device)
            mask[torch.as_tensor(key, dtype=torch.long, device=self.args.device)] = True
            self._class_masks[key] = mask
        return self._class_masks[key]

    @property
    def seen_classes(self) -> list[int]:
        return [c for classes in self.task_classes for c in classes]

    def _loader(self, dataset: Dataset, batch_size: int | None = None) -> DataLoader:
        data = self._remove_unused_columns(dataset, description="continual")
        return DataLoader(
            data,
            batch_size=batch_size or self.args.per_device_eval_batch_size,
            collate_fn=self.data_collator,
            shuffle=False,
        )

    @torch.no_grad()
    def _features(self, dataset: Dataset, task: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Head inputs over ``dataset`` with prompt ``task`` (``None``: frozen, prompt-free)."""
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        features, labels = [], []
        for batch in self._loader(dataset):
            labels.append(batch.pop("labels"))
            batch = {k: v.to(self.args.device) for k, v in batch.items()}
            with self._head_input() as captured:
                if task is None:
                    with model.disable_adapter():
                        model(**batch)
                else:
                    model(**batch, prompt_ids=task)
            features.append(captured[0].float().cpu())  # host: per task, for the mixture fits
        model.train(was_training)
        return torch.cat(features), torch.cat(labels)

    def _fit_mixtures(self, features: torch.Tensor, labels: torch.Tensor, classes, offset: int):
        return {
            c: fit_class_mixture(
                features[labels == c], self.args.num_components, seed=self.args.seed + offset + c
            )
            for c in classes
        }

    # ------------------------------------------------------------------------ loss
    def _replay(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``replay_factor × batch`` pseudo-features of earlier classes.

        Classes are drawn uniformly, then a centroid by its weight, then ``mean + std · N(0, I)``
        (one multinomial over the stacked centroids of :attr:`_replay_table`). The draws of
        :data:`REPLAY_CHUNK` steps are made at once (a step's are a fixed function of the seed,
        task, step and process), so a step pays a slice instead of a handful of small ops.
        """
        count = self.args.replay_factor * batch_size
        if self._replay_table is None or count == 0:
            return None
        block = max(count, self.args.replay_factor * self.args.per_device_train_batch_size)
        chunk, offset = divmod(self.state.global_step, REPLAY_CHUNK)
        key = (chunk, block)
        if self._replay_chunk is None or self._replay_chunk[0] != key:
            means, stds, classes, probabilities = self._replay_table
            generator = keyed_generator(
                self.args.seed, len(self.task_classes), chunk, self.args.process_index
            )
            draws = REPLAY_CHUNK * block
            picks = torch.multinomial(probabilities, draws, replacement=True, generator=generator)
            # host: drawn on the CPU so that a step's draws do not depend on the device; the
            # chunk moves to the device once per REPLAY_CHUNK steps, not once per step
            noise = torch.randn(draws, means.shape[1], generator=generator)
            device = self.args.device
            features = (means[picks] + stds[picks] * noise).to(device, non_blocking=True)
            self._replay_chunk = (key, features, classes[picks].to(device, non_blocking=True))
        _, features, classes = self._replay_chunk
        rows = slice(offset * block, offset * block + count)
        return features[rows], classes[rows]

    def _build_replay_table(self) -> None:
        self._replay_chunk = None
        old = [c for c in self.seen_classes if c in self.prompted_mixtures]
        if not old:
            self._replay_table = None
            return
        mixtures = [self.prompted_mixtures[c] for c in old]
        self._replay_table = (
            torch.cat([m.means for m in mixtures]),
            torch.cat([m.variances.sqrt() for m in mixtures]),
            # host: per task; the replay draws are made on the host (see _replay)
            torch.cat([torch.full((len(m.weights),), c) for c, m in zip(old, mixtures)]),
            torch.cat([m.weights / m.weights.sum() / len(old) for m in mixtures]),
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """CE masked to the task + HiDe regulariser + global / per-group SupCon (Sec. 4)."""
        if self.current_task is None:
            raise RuntimeError("train through train_task()/fit_stream(), not train().")
        args = self.args
        labels = inputs.pop("labels")
        with self._head_input() as captured:
            outputs = model(**inputs, prompt_ids=self.current_task)
        features = captured[0]
        mask = self._class_mask(self.task_classes[self.current_task])
        logits = outputs.logits.masked_fill(~mask, float("-inf"))
        ce = F.cross_entropy(logits, labels)
        loss = ce
        logs: dict[str, Any] = {"ce_loss": ce.detach()}
        if args.hide_reg > 0:
            hide = hide_regulariser(features, self._old_centroids, args.hide_temperature)
            loss = loss + args.hide_reg * hide
            logs["hide_loss"] = hide.detach()
        if args.hierarchical and (args.reg_glob > 0 or args.reg_sub > 0):
            all_features, all_labels = features, labels
            replay = self._replay(len(labels))
            if replay is not None:
                all_features = torch.cat([features, replay[0].to(features.dtype)])
                all_labels = torch.cat([labels, replay[1]])
            glob, sub = self._supcon(all_features, all_labels)
            loss = loss + args.reg_glob * glob + args.reg_sub * sub
            logs.update(supcon_global=glob.detach(), supcon_groups=sub.detach())
        self.record(**logs)
        return (loss, outputs) if return_outputs else loss

    # ------------------------------------------------------------------------ one task
    def _begin_task(self, dataset: Dataset, classes: list[int]) -> None:
        """Register the task (its classes and frozen-feature mixtures), then :meth:`_prepare_task`."""
        self.task_classes.append(classes)
        self.current_task = len(self.task_classes) - 1
        self._task_in_progress = True
        frozen, labels = self._features(dataset, task=None)
        self._frozen_task_features = (frozen, labels)
        self.frozen_mixtures.update(self._fit_mixtures(frozen, labels, classes, offset=0))
        self._prepare_task()

    def _prepare_task(self) -> None:
        """What the loss of the registered task uses: groups, Γ, SupCon terms, old centroids,
        replay table; prompt ``t`` starts from prompt ``t − 1``."""
        task = self.current_task
        seen = self.seen_classes
        if self.taxonomy is not None:
            self._groups = self.taxonomy.leaf_groups(seen)
        else:
            means = {c: _mixture_mean(self.frozen_mixtures[c]) for c in seen}
            groups = self.args.num_groups or max(1, len(seen) // 2)
            self._groups = LabelTree.from_embeddings(means, min(groups, len(seen))).leaf_groups()
        self._gamma = None
        if self.args.use_ot:
            self._gamma = self.distances.gamma(
                self.frozen_mixtures, self.num_labels, self.args.ot_delta
            ).to(self.args.device)
        self._supcon = SupConTerms(
            self.num_labels,
            [("global", False), ("groups", self._gamma is not None)],
            self._groups,
            self._gamma,
            self.args.supcon_temperature,
        )
        old = [self.prompted_mixtures[c].means for c in seen if c in self.prompted_mixtures]
        self._old_centroids = torch.cat(old).to(self.args.device) if old else None
        self._build_replay_table()
        if task > 0 and self.args.init_from_previous:
            self._pool().copy_prompt_(task - 1, task)

    def _train_head(
        self,
        head: nn.Module,
        mixtures: Mapping[int, ClassMixture],
        epochs: int,
        real: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Re-train ``head`` on pseudo-features of the seen classes (+ ``real`` ones): SGD 0.9
        momentum, weight decay 5e-4, cosine schedule (HiDe-Prompt's classifier alignment)."""
        if epochs == 0:
            return
        params = [p for p in head.parameters()]
        optimizer = torch.optim.SGD(
            params, lr=self.args.ca_learning_rate, momentum=0.9, weight_decay=5e-4
        )
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        mask = self._class_mask(self.seen_classes)
        # host: once per task; draws independent of the device, moved once per epoch below
        generator = torch.Generator().manual_seed(self.args.seed + 7919 * len(self.task_classes))
        # the global batch: every process runs this same loop, so 1 or N processes agree
        batch = self.args.per_device_train_batch_size * self.args.world_size
        requires_grad = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for _ in range(epochs):
                feats, labels = [], []
                for c in self.seen_classes:
                    if c in mixtures:
                        n = self.args.ca_samples_per_class
                        feats.append(mixtures[c].sample(n, generator))
                        labels.append(torch.full((n,), c, dtype=torch.long))  # host: see above
                if real is not None:
                    feats.append(real[0])
                    labels.append(real[1])
                x, y = torch.cat(feats), torch.cat(labels)
                order = torch.randperm(len(y), generator=generator)  # host: see above
                x, y = x[order].to(self.args.device), y[order].to(self.args.device)
                for start in range(0, len(y), batch):
                    logits = head(x[start : start + batch]).masked_fill(~mask, float("-inf"))
                    loss = F.cross_entropy(logits, y[start : start + batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                schedule.step()
        for p, flag in zip(params, requires_grad):
            p.requires_grad_(flag)

    def _end_task(self, dataset: Dataset, classes: list[int]) -> dict[str, float]:
        task = self.current_task
        prompted, labels = self._features(dataset, task=task)
        old_means = {c: _mixture_mean(m) for c, m in self.prompted_mixtures.items()}
        new = {c: prompted[labels == c] for c in classes}
        cosine = same_group_cosine(new, old_means, self._groups)
        self.prompted_mixtures.update(self._fit_mixtures(prompted, labels, classes, offset=10_000))
        if task > 0:
            self._train_head(self._head(), self.prompted_mixtures, self.args.ca_epochs)
        if self.tii_head is None:
            dim = self._frozen_task_features[0].shape[1]
            self.tii_head = nn.Linear(dim, self.num_labels).to(self.args.device)
            torch.manual_seed(self.args.seed)
            self.tii_head.reset_parameters()
        old_frozen = {c: m for c, m in self.frozen_mixtures.items() if c not in classes}
        self._train_head(
            self.tii_head, old_frozen, self.args.tii_epochs, real=self._frozen_task_features
        )
        self._frozen_task_features = None
        return {} if cosine is None else {"same_group_cosine": cosine}

    def train_task(
        self,
        dataset: Dataset,
        classes: list[int] | None = None,
        resume_from_checkpoint: str | None = None,
    ) -> dict[str, float]:
        """Learn the next task from ``dataset`` (its ``labels`` are the task's classes).

        The task is recorded as learned only once its training and end-of-task steps finished:
        if they raise (or are interrupted), its registration is undone and, for a task started
        here, the prompts, heads and mixtures are rolled back, so it can be trained again (a
        resumed task: resume it again from its checkpoint). Its checkpoints go to ``output_dir/task-t/``
        (with the continual state and :data:`PROGRESS_FILE`). ``resume_from_checkpoint``: a
        checkpoint of this task, whose continual state :meth:`fit_stream` has loaded (the task
        is then registered already). Returns the training metrics plus ``same_group_cosine``
        (new-class features vs the stored means of earlier classes in the same leaf group; from
        the second task on).
        """
        if classes is None:
            classes = sorted({int(y) for y in dataset["labels"]})
        classes = [int(c) for c in classes]
        snapshot = None
        if resume_from_checkpoint is not None:
            if not self._task_in_progress or self.task_classes[-1] != classes:
                raise ValueError(
                    f"resume_from_checkpoint={resume_from_checkpoint}: that checkpoint's task "
                    f"is not the one given (classes {classes}); resume through fit_stream()."
                )
            self._frozen_task_features = self._features(dataset, task=None)
            self._prepare_task()
        else:
            self._check_new_task(classes)
            snapshot = self._snapshot()
            self._begin_task(dataset, classes)
        try:
            self.train_dataset = dataset
            self.optimizer = None  # a fresh optimizer per task (HiDe-Prompt's reinit_optimizer)
            self.lr_scheduler = None
            self.model_wrapped = self.model
            with self._task_output_dir(self.current_task):
                output = self.train(resume_from_checkpoint=resume_from_checkpoint)
            metrics = dict(output.metrics)
            metrics.update(self._end_task(dataset, classes))
        except BaseException:
            self._abandon_task(snapshot)
            raise
        self._task_in_progress = False
        return metrics

    def _check_new_task(self, classes: list[int]) -> None:
        overlap = set(classes) & set(self.seen_classes)
        if overlap:
            raise ValueError(f"classes {sorted(overlap)} were learned by an earlier task.")
        pool_size = self._pool().active_pool_config.pool_size
        if len(self.task_classes) >= pool_size:
            raise ValueError(
                f"the prompt pool holds {pool_size} prompts: one per task; build it with "
                "pool_size = the number of tasks."
            )

    def _snapshot(self) -> dict[str, Any]:
        """What a task changes besides its registration: the trainable tensors (prompts, head),
        the TII head and the prompted mixtures (for :meth:`_abandon_task`)."""
        model = self.accelerator.unwrap_model(self.model)
        return {
            "parameters": {
                n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
            },
            "tii_head": copy.deepcopy(self.tii_head),
            "prompted": dict(self.prompted_mixtures),
        }

    def _abandon_task(self, snapshot: dict[str, Any] | None) -> None:
        """Undo a task whose training or end did not finish, so that it can be trained again."""
        classes = self.task_classes.pop() if self._task_in_progress else []
        for c in classes:
            self.frozen_mixtures.pop(c, None)
        self._task_in_progress = False
        self.current_task = len(self.task_classes) - 1 if self.task_classes else None
        self._frozen_task_features = None
        if snapshot is None:  # a resumed task: the earlier tasks' tensors are not on hand
            for c in classes:
                self.prompted_mixtures.pop(c, None)
            return
        parameters = dict(self.accelerator.unwrap_model(self.model).named_parameters())
        with torch.no_grad():
            for name, value in snapshot["parameters"].items():
                parameters[name].copy_(value)
        self.tii_head = snapshot["tii_head"]
        self.prompted_mixtures.clear()
        self.prompted_mixtures.update(snapshot["prompted"])

    @contextmanager
    def _task_output_dir(self, task: int) -> Iterator[None]:
        """Checkpoints of task ``task`` go to ``output_dir/task-<task>/`` (each task's run of
        ``Trainer.train`` restarts at step 0: one folder would mix the tasks' checkpoint-N)."""
        output_dir = self.args.output_dir
        self.args.output_dir = str(Path(output_dir) / TASK_DIR.format(task))
        try:
            yield
        finally:
            self.args.output_dir = output_dir

    # ------------------------------------------------------------------------ inference
    def _rescore(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The official evaluation trick: group-wise re-scoring by Mahalanobis distances.

        For each leaf group ``g``: ``c*`` = argmax of the logits in ``g``, ``d = Σ_{j∈g}
        W'[c*, j] · m_j(x)`` (``m_j`` = diagonal Mahalanobis distance to the nearest centroid
        of class ``j``'s prompted mixture, ``W'`` = OT distances in the prompted space),
        ``E_g = exp(η0 · max_g logits − η · d)``; logits in ``g`` are multiplied by ``E_g`` and
        all by ``1 / Σ_g E_g``; classes outside every group get −inf.
        """
        seen = self.seen_classes
        distance = torch.full_like(logits, 1e12)
        for c in seen:
            mixture = self.prompted_mixtures[c]
            means, var = mixture.means.to(features), mixture.variances.to(features) + 1e-6
            diff = features[:, None, :] - means[None]
            distance[:, c] = (diff.pow(2) / var[None]).sum(-1).sqrt().min(1).values
        w = self.eval_distances.matrix(self.prompted_mixtures, self.num_labels).to(logits)
        scored = torch.full_like(logits, float("-inf"))
        total = torch.zeros(len(logits), 1, device=logits.device, dtype=logits.dtype)
        factors = []
        for group in self._groups:
            index = torch.as_tensor(group, device=logits.device)
            group_logits = logits[:, index]
            best, arg = group_logits.max(1)
            d = (w[index[arg]][:, index] * distance[:, index]).sum(1)
            energy = torch.exp(self.args.rescoring_eta0 * best - self.args.rescoring_eta * d)
            factors.append((index, group_logits, energy[:, None]))
            total = total + energy[:, None]
        for index, group_logits, energy in factors:
            scored[:, index] = group_logits * energy / total
        return scored

    @torch.no_grad()
    def predict_classes(self, dataset: Dataset) -> dict[str, np.ndarray]:
        """``predictions`` (classes), ``task_predictions`` (TII) and ``labels`` on ``dataset``."""
        if self.tii_head is None:
            raise RuntimeError("no task learned yet: call train_task()/fit_stream() first.")
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        seen = self._class_mask(self.seen_classes)
        class_to_task = torch.zeros(self.num_labels, dtype=torch.long, device=self.args.device)
        for task, classes in enumerate(self.task_classes):
            class_to_task[torch.as_tensor(classes, device=self.args.device)] = task
        predictions, task_predictions, labels = [], [], []
        for batch in self._loader(dataset):
            labels.append(batch.pop("labels"))
            batch = {k: v.to(self.args.device) for k, v in batch.items()}
            with self._head_input() as captured, model.disable_adapter():
                model(**batch)
            frozen = captured[0].float()
            tii = self.tii_head(frozen).masked_fill(~seen, float("-inf"))
            tasks = class_to_task[tii.argmax(1)]
            with self._head_input() as captured:
                logits = model(**batch, prompt_ids=tasks).logits.float()
            logits = logits.masked_fill(~seen, float("-inf"))
            if self.args.eval_rescoring:
                logits = self._rescore(logits, captured[0].float())
            predictions.append(logits.argmax(1))
            task_predictions.append(tasks)
        model.train(was_training)
        # host: the results, copied once after the last batch
        return {
            "predictions": torch.cat(predictions).cpu().numpy(),
            "task_predictions": torch.cat(task_predictions).cpu().numpy(),
            "labels": torch.cat(labels).cpu().numpy(),
        }

    def evaluate_seen(self, datasets: list[Dataset]) -> dict[str, list[float]]:
        """Accuracy and TII accuracy on each of ``datasets`` (one per seen task, in order)."""
        accuracy, tii = [], []
        for task, data in enumerate(datasets):
            out = self.predict_classes(data)
            accuracy.append(float(np.mean(out["predictions"] == out["labels"])))
            tii.append(float(np.mean(out["task_predictions"] == task)))
        return {"accuracy": accuracy, "tii_accuracy": tii}

    def fit_stream(
        self,
        stream: TaskStream,
        eval_split: str = "test",
        resume_from_checkpoint: str | bool | None = None,
    ) -> dict[str, Any]:
        """Learn every task of ``stream``, evaluating all seen tasks after each one.

        ``resume_from_checkpoint``: ``True`` / ``"last"``: the newest complete checkpoint of
        ``output_dir/task-*/`` (incomplete ones are skipped with a warning), or a checkpoint
        folder; the continual state, the results of the finished tasks and the interrupted
        task's training state are restored, and the stream goes on from that task (exactly as
        if it had not stopped). Returns ``accuracy_matrix`` (``acc[i][j]``: task ``j`` after
        task ``i``; NaN above the diagonal), ``faa`` (final average accuracy), ``forgetting``,
        ``tii_accuracy`` (per stage, averaged over seen tasks) and ``same_group_cosine`` (per
        task from the second).
        """
        size = len(stream)
        acc = np.full((size, size), np.nan)
        self._stream_results = results = _empty_results()
        checkpoint = self._stream_checkpoint(resume_from_checkpoint)
        start = 0
        if checkpoint is not None:
            start = self._restore_stream(checkpoint, stream)
            for task, row in enumerate(results["accuracy_matrix"]):
                acc[task, : task + 1] = row
        tii, cosines = results["tii_accuracy"], results["same_group_cosine"]
        for task in range(start, size):
            data = stream[task]
            metrics = self.train_task(
                data["train"],
                stream.task_classes[task],
                resume_from_checkpoint=checkpoint if task == start else None,
            )
            if "same_group_cosine" in metrics:
                cosines.append(metrics["same_group_cosine"])
            seen = self.evaluate_seen([stream[j][eval_split] for j in range(task + 1)])
            acc[task, : task + 1] = seen["accuracy"]
            results["accuracy_matrix"].append(list(seen["accuracy"]))
            tii.append(float(np.mean(seen["tii_accuracy"])))
            self.log({f"stage_{task}_average_accuracy": float(np.mean(seen["accuracy"]))})
        return {
            "accuracy_matrix": acc.tolist(),  # host: results (numpy)
            "faa": final_average_accuracy(acc),
            "forgetting": average_forgetting(acc),
            "tii_accuracy": tii,
            "same_group_cosine": cosines,
        }

    # ------------------------------------------------------------------------ resume
    def save_resume_state(self, folder: Path) -> None:
        """In a checkpoint of the task in progress: which task it is and the stream's results
        so far (:data:`PROGRESS_FILE`); the continual state is written by :meth:`save_model`."""
        if not self._task_in_progress:
            return
        progress = {
            "format_version": 1,
            "task": self.current_task,
            "classes": self.task_classes[self.current_task],
            **self._stream_results,
        }
        atomic_write_text(Path(folder) / PROGRESS_FILE, json.dumps(progress, indent=2))

    def checkpoint_problem(self, folder: Path) -> str | None:
        """A Trainer checkpoint's problems, or a missing continual state / progress file."""
        for name in (PROGRESS_FILE, STATE_CONFIG, STATE_FILE):
            if not (Path(folder) / name).is_file():
                return f"it has no {name} (not a checkpoint of fit_stream/train_task, or cut short)"
        return super().checkpoint_problem(folder)

    def _stream_checkpoint(self, value: str | bool | None) -> str | None:
        """The checkpoint ``resume_from_checkpoint`` names: for ``True`` / ``"last"`` the newest
        complete one of the latest task folder that has one."""
        if value is None or value is False or value == "":
            return None
        if value is True or str(value).lower() in ("true", "last"):
            root = Path(self.args.output_dir)
            tasks = sorted(
                (int(p.name.split("-")[1]) for p in root.glob("task-*") if p.name[5:].isdigit()),
                reverse=True,
            )
            for task in tasks:
                path = last_complete_checkpoint(
                    root / TASK_DIR.format(task), self.checkpoint_problem
                )
                if path is not None:
                    return path
            raise ValueError(
                f"`resume_from_checkpoint={value}` but {root} holds no complete "
                "task-t/checkpoint-N folder (incomplete ones are named in the warnings above); "
                "pass a checkpoint's path or run without the flag."
            )
        return resolve_checkpoint(value, self.args.output_dir, self.checkpoint_problem)

    def _restore_stream(self, checkpoint: str, stream: TaskStream) -> int:
        """Load ``checkpoint``'s continual state and results; return the task it interrupted."""
        progress = json.loads((Path(checkpoint) / PROGRESS_FILE).read_text())
        task = int(progress["task"])
        expected = [list(map(int, c)) for c in stream.task_classes[: task + 1]]
        self.load_continual_state(checkpoint)
        if self.task_classes != expected:
            raise ValueError(
                f"the checkpoint {checkpoint} was written learning the tasks {self.task_classes}, "
                f"but this stream's first {task + 1} tasks are {expected}; resume with the "
                "stream (class order) the run was started with."
            )
        self._task_in_progress = True
        self.current_task = task
        for key in self._stream_results:
            self._stream_results[key].extend(progress[key])
        return task

    # ------------------------------------------------------------------------ save / load
    def save_continual_state(self, directory: str | Path) -> None:
        """Write the TII head, the class mixtures and the task/taxonomy bookkeeping.

        With the adapter (``save_model``) this is everything :meth:`predict_classes` needs:
        reload with :meth:`load_continual_state` on a trainer around the reloaded adapter. The
        two files are one all-or-nothing save (:func:`hf_extensions.atomic.atomic_save`).
        """
        tensors: dict[str, torch.Tensor] = {}
        if self.tii_head is not None:
            # host: saving
            tensors["tii.weight"] = self.tii_head.weight.detach().cpu()
            tensors["tii.bias"] = self.tii_head.bias.detach().cpu()  # host: saving
        mixture_classes = {}
        for space, mixtures in (
            ("frozen", self.frozen_mixtures),
            ("prompted", self.prompted_mixtures),
        ):
            mixture_classes[space] = sorted(int(c) for c in mixtures)
            for c, m in mixtures.items():
                for name in ("means", "variances", "weights"):
                    tensors[f"{space}.{c}.{name}"] = getattr(m, name).contiguous()
        meta = {
            "task_classes": self.task_classes,
            "groups": self._groups,
            "taxonomy": None if self.taxonomy is None else self.taxonomy.to_dict(),
            "class_names": None if self.taxonomy is None else self.taxonomy.class_names,
            "ot_cache": [[i, j, v] for (i, j), v in self.distances.cache.items()],
            "mixture_classes": mixture_classes,
            "tii_head": self.tii_head is not None,
        }
        with atomic_save(directory) as stage:
            save_file(tensors, str(stage / STATE_FILE))
            (stage / STATE_CONFIG).write_text(json.dumps(meta, indent=2))

    def load_continual_state(self, directory: str | Path) -> None:
        """Restore what :meth:`save_continual_state` wrote.

        An interrupted save is first finished or discarded; the record and every tensor are
        checked (a class mixture or TII tensor that is missing, unexpected, or of another shape
        than this model's features and labels is refused naming the file) before anything of
        this trainer changes.
        """
        directory = Path(directory)
        recover_interrupted_save(directory)
        meta_path, path = directory / STATE_CONFIG, directory / STATE_FILE
        meta = read_json(meta_path)
        keys = ("task_classes", "groups", "taxonomy", "class_names", "ot_cache")
        lacking = [k for k in (*keys, "mixture_classes", "tii_head") if k not in meta]
        if lacking:
            raise ValueError(f"{meta_path} lacks {lacking}: {FIX}.")
        tensors = read_tensors(path)
        dim, labels = int(self._head().in_features), self.num_labels
        expected: dict[str, tuple[int, ...]] = {}
        for space, classes in meta["mixture_classes"].items():
            for c in classes:
                found = tensors.get(f"{space}.{c}.means", tensors.get(f"{space}.{c}.weights"))
                k = int(found.shape[0]) if found is not None and found.dim() else 0
                expected.update(
                    {f"{space}.{c}.means": (k, dim), f"{space}.{c}.variances": (k, dim)}
                )
                expected[f"{space}.{c}.weights"] = (k,)
        if meta["tii_head"]:
            expected.update({"tii.weight": (labels, dim), "tii.bias": (labels,)})
        check_tensors(path, tensors, expected)
        mixtures = {
            space: {
                int(c): ClassMixture(
                    *(tensors[f"{space}.{c}.{name}"] for name in ("means", "variances", "weights"))
                )
                for c in meta["mixture_classes"].get(space, [])
            }
            for space in ("frozen", "prompted")
        }
        self.task_classes = [list(map(int, c)) for c in meta["task_classes"]]
        self.current_task = len(self.task_classes) - 1 if self.task_classes else None
        self._groups = [list(map(int, g)) for g in meta["groups"]]
        taxonomy = meta["taxonomy"]
        self.taxonomy = None if taxonomy is None else LabelTree(taxonomy, meta["class_names"])
        self.distances.cache = {(int(i), int(j)): float(v) for i, j, v in meta["ot_cache"]}
        for space, target in (
            ("frozen", self.frozen_mixtures),
            ("prompted", self.prompted_mixtures),
        ):
            target.clear()
            target.update(mixtures[space])
        self.tii_head = None
        if meta["tii_head"]:
            weight = tensors["tii.weight"]
            self.tii_head = nn.Linear(weight.shape[1], weight.shape[0]).to(self.args.device)
            with torch.no_grad():
                self.tii_head.weight.copy_(weight)
                self.tii_head.bias.copy_(tensors["tii.bias"])

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter (prompts + head) and the continual state beside it, as one all-or-nothing
        save (:func:`hf_extensions.atomic.atomic_save`): a kill between the two can no longer
        leave a new adapter with the previous tasks' state."""
        if not self.args.should_save:
            super()._save(output_dir, state_dict)
            return
        with atomic_save(output_dir if output_dir is not None else self.args.output_dir) as stage:
            super()._save(str(stage), state_dict)
            if self.task_classes:
                self.save_continual_state(stage)

    def card_hyperparameters(self) -> dict[str, Any]:
        values = super().card_hyperparameters()
        values["tasks_learned"] = len(self.task_classes)
        values["taxonomy"] = "given" if self.taxonomy is not None else "agglomerative"
        return values

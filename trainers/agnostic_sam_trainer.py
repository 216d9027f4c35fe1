"""Agnostic-SAM as a ``Trainer`` subclass."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from hf_extensions.perturbation import (
    combine_directions,
    direction_norm,
    local_gradients_of_each,
    loss_scaler,
)
from trainers.agnostic_sam_config import AgnosticSAMConfig
from trainers.perturbation_trainer import PerturbationTrainer, batch_rows, slice_rows

logger = logging.getLogger(__name__)


class AgnosticSAMTrainer(PerturbationTrainer):
    """Agnostic Sharpness-Aware Minimization (Nguyen et al., arXiv 2406.07107).

    SAM seeks flat minima of the training loss; MAML adapts on one split and is judged on
    another. Agnostic-SAM does both in one perturbation, on each chunk ``B`` of the batch split
    into ``B_tr`` (first rows) and ``B_val`` (the last ``val_fraction`` of the rows):

        g_tr  = ∇L_tr(θ)
        g_val = ∇L_val(θ)                     (chain=True: at θ + ρ_tr g_tr/‖g_tr‖)
        e     = ρ_tr g_tr/‖g_tr‖ − ρ_val g_val/‖g_val‖      (ASAM-style with adaptive=True)
        ∇L_final(θ + e) → p.grad               (final_grad_on: full | train | sum)

    then the Trainer's optimizer step. Cost: a half-batch pass per split and one full pass, the
    arithmetic of SAM's two full passes (``fuse_split_passes`` takes ``g_tr`` and ``g_val`` from
    one forward pass instead: one call fewer, but each ``autograd.grad`` call runs a backward pass
    over the whole batch). The split is by position, not random, so that resuming from a
    checkpoint is exact (batches are already shuffled by the sampler).

    The official repository (anh-ntv/AgnosticSAM) publishes no code; it says the method builds on
    davda54/sam and OT-MDR (halves of the batch, chained perturbations). Where the paper leaves a
    choice open it is a config field; the defaults follow the update as written in the spec
    (unchained, final gradient on the whole batch). Logged: ``perturbation_norm``,
    ``train_split_loss`` and ``val_split_loss`` (both at θ, or the latter at θ + e_tr when
    chained).
    """

    method = "agnostic-sam"
    paper = "Agnostic Sharpness-Aware Minimization"
    arxiv_id = "2406.07107"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, AgnosticSAMConfig):
            raise TypeError(
                f"AgnosticSAMTrainer needs an AgnosticSAMConfig, got {type(self.args).__name__}."
            )
        self._warned_single_row = False
        self._fusion_checked = False
        self._fusion_ok = True

    min_chunk_rows = 2

    def split(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """``(B_tr, B_val)``: the last ``round(val_fraction * rows)`` rows (at least 1) are B_val.

        A batch of one row (the last, short batch of an epoch; the config refuses batches of one
        row) cannot be split: ``B_val`` is ``None`` and the step is a SAM step of radius
        ``rho_train`` on that row, with a warning the first time.
        """
        rows = batch_rows(inputs)
        if rows < 2:
            if not self._warned_single_row:
                self._warned_single_row = True
                logger.warning(
                    "Agnostic-SAM got a batch of 1 row (the last batch of an epoch?), which "
                    "cannot be split into training and validation parts: it takes a SAM step. "
                    "Set dataloader_drop_last=True to drop such batches."
                )
            return inputs, None
        val_rows = min(max(round(self.args.val_fraction * rows), 1), rows - 1)
        return slice_rows(inputs, 0, rows - val_rows), slice_rows(inputs, rows - val_rows, rows)

    def perturbed_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch
    ) -> torch.Tensor:
        args = self.args
        train, val = self.split(inputs)
        split = self._split_gradients(model, inputs, val) if self._can_fuse(inputs, val) else None
        if split is not None:
            train_loss, val_loss, train_grads, val_grads = split
        else:
            train_loss, train_grads = self.local_gradients(model, train)
        direction = self.direction(model, train_grads, args.rho_train)
        if val is not None:
            if split is None and args.chain:
                with self.perturbed(model, direction):
                    val_loss, val_grads = self.local_gradients(model, val)
            elif split is None:
                val_loss, val_grads = self.local_gradients(model, val)
            val_direction = self.direction(model, val_grads, args.rho_val)
            direction = combine_directions((1.0, direction), (-1.0, val_direction))
            self.record(val_split_loss=val_loss)
        with self.perturbed(model, direction):
            if args.final_grad_on == "full" or val is None:
                loss = self.loss(model, inputs, num_items_in_batch)
            elif args.final_grad_on == "train":
                loss = self.loss(model, train, num_items_in_batch) * self.subset_scale(
                    inputs, train
                )
            else:
                loss = self.loss(model, train, num_items_in_batch) * self.subset_scale(
                    inputs, train
                ) + self.loss(model, val, num_items_in_batch) * self.subset_scale(inputs, val)
            self.backward(loss)
        self.record(perturbation_norm=direction_norm(direction), train_split_loss=train_loss)
        return loss.detach()

    # -- one forward pass for g_tr and g_val -------------------------------------------------

    def _can_fuse(self, inputs: dict[str, Any], val: dict[str, Any] | None) -> bool:
        """Whether ``g_tr`` and ``g_val`` may come from one pass: unchained, a split batch, the
        model's own single-label cross-entropy (no ``compute_loss_func``, no label smoothing)."""
        args = self.args
        labels = inputs.get("labels")
        return (
            args.fuse_split_passes
            and self._fusion_ok
            and not args.chain
            and val is not None
            and self.compute_loss_func is None
            and self.label_smoother is None
            and isinstance(labels, torch.Tensor)
            and labels.dim() == 1
            and not labels.is_floating_point()
        )

    def _split_gradients(self, model: nn.Module, inputs: dict[str, Any], val: dict[str, Any]):
        """``(L_tr, L_val, g_tr, g_val)`` from one forward pass over ``inputs``, or ``None``.

        The split losses are cross-entropy means over the rows of each split, taken from the
        logits of the one pass. The first time, their row-weighted mean is checked against the
        model's own loss of the batch; where they differ (the model's loss is not a row mean of
        cross-entropy) fusion is switched off for the run, with a warning, and this returns
        ``None``: the caller takes the two-pass path.
        """
        rows = batch_rows(inputs)
        val_rows = batch_rows(val)
        cut = rows - val_rows
        labels = inputs["labels"]
        model_loss: list[torch.Tensor] = []

        def split_losses():
            if self._random_state is not None:
                self._random_state.restore()
            with self.compute_loss_context_manager():
                outputs = model(**inputs)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
            model_loss.append(outputs["loss"] if isinstance(outputs, dict) else outputs[0])
            if logits.dim() != 2 or logits.shape[0] != rows:
                logits = logits.new_full((rows, 1), float("nan"))  # not a classifier: check fails
            return (
                nn.functional.cross_entropy(logits[:cut], labels[:cut]),
                nn.functional.cross_entropy(logits[cut:], labels[cut:]),
            )

        losses, grads = local_gradients_of_each(
            split_losses,
            self.parameters_of(model),
            model=model,
            accelerator=self.accelerator,
            scaler=loss_scaler(self.accelerator),
        )
        if not self._fusion_checked:
            self._fusion_checked = True
            mean = (losses[0] * cut + losses[1] * val_rows) / rows
            reference = model_loss[0].detach().float()
            self._fusion_ok = bool(torch.allclose(mean.float(), reference, rtol=1e-4, atol=1e-6))
            if not self._fusion_ok:
                logger.warning(
                    "Agnostic-SAM: the model's loss is not the row mean of cross-entropy on its "
                    "logits, so g_tr and g_val cannot come from one pass; using one pass per "
                    "split (set fuse_split_passes=False to silence this)."
                )
                return None
        return losses[0], losses[1], grads[0], grads[1]

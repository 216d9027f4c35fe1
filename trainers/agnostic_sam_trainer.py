"""Agnostic-SAM as a ``Trainer`` subclass."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from hf_extensions.perturbation import combine_directions, direction_norm
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

    then the Trainer's optimizer step. Cost: two half-batch passes and one full pass, about two
    plain steps, like SAM. The split is by position, not random, so that resuming from a
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
        train_loss, train_grads = self.local_gradients(model, train)
        direction = self.direction(model, train_grads, args.rho_train)
        if val is not None:
            if args.chain:
                with self.perturbed(model, direction):
                    val_loss, val_grads = self.local_gradients(model, val)
            else:
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

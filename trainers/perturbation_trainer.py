"""Base ``Trainer`` of the SAM family: the second pass at perturbed weights inside Trainer's loop.

A subclass implements :meth:`PerturbationTrainer.perturbed_step` with the helpers of this class
(which wrap :mod:`hf_extensions.perturbation`); everything else (optimizer, scheduler, gradient
clipping, accumulation, mixed precision, logging, checkpointing, ``push_to_hub``) is the stock
``Trainer``'s. Only ``training_step`` is overridden (logging of the method's metrics and the model card
come from :class:`trainers.method_trainer.MethodTrainer`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hf_extensions.perturbation import (
    Tensors,
    ascent_direction,
    local_gradients,
    perturbed_weights,
    trainable_parameters,
)
from trainers.method_trainer import MethodTrainer
from trainers.perturbation_config import PerturbationConfig


def batch_rows(inputs: Mapping[str, Any]) -> int:
    """Number of examples in a batch: the first dimension of its first tensor."""
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("The batch holds no tensor with a batch dimension.")


def slice_rows(inputs: Mapping[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows ``start:stop`` of every tensor whose first dimension is the batch; the rest as is."""
    rows = batch_rows(inputs)
    return {
        key: value[start:stop]
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows
        else value
        for key, value in inputs.items()
    }


class PerturbationTrainer(MethodTrainer):
    """``Trainer`` whose gradient is taken at perturbed weights (see the module docstring).

    Subclasses set :attr:`method`, :attr:`paper`, :attr:`arxiv_id` (see :class:`MethodTrainer`) and
    implement :meth:`perturbed_step`. Each micro-batch is cut into chunks of
    ``args.sharpness_batch_size`` rows (one chunk by default); ``perturbed_step`` runs on each.

    Data parallelism: DDP (``accelerate launch --multi_gpu``) is supported; DeepSpeed and FSDP are
    refused (their engines own the backward pass and shard the parameters that the perturbation
    moves).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, PerturbationConfig):
            raise TypeError(
                f"{type(self).__name__} needs its config class (a PerturbationConfig), got "
                f"{type(self.args).__name__}."
            )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                f"{type(self).__name__} supports one device and DDP (accelerate launch "
                "--multi_gpu); DeepSpeed and FSDP are not supported."
            )
        self._loss_scaled = False
        self._chunk_weight = 1.0

    # -- the step ---------------------------------------------------------------------------

    def perturbed_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch
    ) -> torch.Tensor:
        """Accumulate into ``p.grad`` the gradient of one chunk; return its (unweighted) loss.

        Implementations call :meth:`backward` exactly once, for the loss at perturbed weights.
        """
        raise NotImplementedError

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        self._loss_scaled = self._is_loss_scaled_for_ga(num_items_in_batch)
        rows = batch_rows(inputs)
        size = self.args.sharpness_batch_size or rows
        starts = list(range(0, rows, size))
        total = None
        for index, start in enumerate(starts):
            chunk = slice_rows(inputs, start, min(start + size, rows))
            fraction = batch_rows(chunk) / rows
            self._chunk_weight = (
                1.0 if self._loss_scaled else fraction / self.current_gradient_accumulation_steps
            )
            last = index == len(starts) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                loss = self.perturbed_step(model, chunk, num_items_in_batch)
            weighted = loss.detach() * self._chunk_weight
            total = weighted if total is None else total + weighted
        return total

    def _is_loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        """The stock Trainer's rule: is the loss already normalised over the accumulated batch?"""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (
            self.model_accepts_loss_kwargs and num_items_in_batch is not None
        ) or self.compute_loss_func is not None

    # -- helpers for perturbed_step ---------------------------------------------------------

    def loss(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None
    ) -> torch.Tensor:
        """The Trainer's loss of ``inputs`` (``compute_loss`` in its context manager)."""
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        return loss

    def subset_scale(self, inputs: dict[str, Any], subset: dict[str, Any]) -> float:
        """Factor that makes the loss of ``subset`` a mean over its rows, like a whole batch's.

        A loss normalised by ``num_items_in_batch`` is a sum over the subset divided by the
        item count of the accumulated batch; it is scaled up by rows(batch)/rows(subset). A
        per-batch mean needs nothing.
        """
        return batch_rows(inputs) / batch_rows(subset) if self._loss_scaled else 1.0

    def local_gradients(
        self, model: nn.Module, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, Tensors]:
        """Mean loss of ``inputs`` and its gradient on this process, ``p.grad`` untouched."""
        return local_gradients(
            lambda: self.loss(model, inputs),
            trainable_parameters(model),
            model=model,
            accelerator=self.accelerator,
            scaler=self.accelerator.scaler,
        )

    def direction(self, model: nn.Module, grads: Tensors, rho: float) -> Tensors:
        """The configured ascent direction of radius ``rho`` (SAM or ASAM, global or per tensor)."""
        return ascent_direction(
            grads,
            trainable_parameters(model),
            rho=rho,
            adaptive=self.args.adaptive,
            adaptive_eta=self.args.adaptive_eta,
            norm=self.args.perturb_norm,
        )

    def perturbed(self, model: nn.Module, direction: Tensors) -> contextlib.AbstractContextManager:
        """Weights at ``theta + direction`` inside the block (BatchNorm statistics frozen)."""
        return perturbed_weights(
            trainable_parameters(model),
            direction,
            model=model,
            freeze_batchnorm_stats=self.args.freeze_batchnorm_stats,
        )

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the final loss, weighted for the chunk and accumulation like Trainer's."""
        self.accelerator.backward(loss * self._chunk_weight)

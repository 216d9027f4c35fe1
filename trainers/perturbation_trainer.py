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
    RandomState,
    Tensors,
    ascent_direction,
    gradients_finite,
    local_gradients,
    loss_scaler,
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


def chunk_bounds(rows: int, size: int, min_rows: int = 1) -> list[tuple[int, int]]:
    """``[start, stop)`` of consecutive chunks of ``size`` rows; a last chunk of fewer than
    ``min_rows`` rows joins the one before it."""
    bounds = [(start, min(start + size, rows)) for start in range(0, rows, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < min_rows:
        bounds[-2:] = [(bounds[-2][0], rows)]
    return bounds


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
        if str(getattr(self.args.optim, "value", self.args.optim)) in ("lomo", "adalomo"):
            raise ValueError(
                f"{type(self).__name__} needs the gradient in p.grad before the optimizer step; "
                "LOMO / AdaLOMO fuse the update into the backward pass. Choose another `optim`."
            )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                f"{type(self).__name__} supports one device and DDP (accelerate launch "
                "--multi_gpu); DeepSpeed and FSDP are not supported."
            )
        self._loss_scaled = False
        self._chunk_weight = 1.0
        self._random_state: RandomState | None = None
        self._overflow = False
        self._step_parameters: list[nn.Parameter] | None = None

    # -- the step ---------------------------------------------------------------------------

    #: The fewest rows ``perturbed_step`` accepts; a smaller leftover chunk joins the previous one.
    min_chunk_rows: int = 1

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
        self._step_parameters = trainable_parameters(model)
        rows = batch_rows(inputs)
        bounds = chunk_bounds(rows, self.args.sharpness_batch_size or rows, self.min_chunk_rows)
        total = None
        for index, (start, stop) in enumerate(bounds):
            chunk = slice_rows(inputs, start, stop)
            fraction = batch_rows(chunk) / rows
            self._chunk_weight = (
                1.0 if self._loss_scaled else fraction / self.current_gradient_accumulation_steps
            )
            last = index == len(bounds) - 1
            self._random_state = RandomState()
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                loss = self.perturbed_step(model, chunk, num_items_in_batch)
            weighted = loss.detach() * self._chunk_weight
            total = weighted if total is None else total + weighted
        self._random_state = None
        if self._overflow:
            self._force_skipped_step(model)
        self._step_parameters = None
        return total

    def _force_skipped_step(self, model: nn.Module) -> None:
        """A local pass overflowed under fp16 (no perturbation was applied for it): make the
        GradScaler skip this optimizer step and lower its scale, as for an overflow of the
        final pass. One infinite gradient suffices; DDP's all-reduce carries it to every rank."""
        self._overflow = False
        for p in self.parameters_of(model):
            if p.grad is not None:
                p.grad.fill_(float("inf"))
                return

    def _is_loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        """The stock Trainer's rule: is the loss already normalised over the accumulated batch?"""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (
            self.model_accepts_loss_kwargs and num_items_in_batch is not None
        ) or self.compute_loss_func is not None

    # -- helpers for perturbed_step ---------------------------------------------------------

    def parameters_of(self, model: nn.Module) -> list[nn.Parameter]:
        """The trainable parameters of ``model``, listed once per step (walking the module tree
        on every pass and direction costs about 5% of a step of a small model)."""
        if self._step_parameters is not None:
            return self._step_parameters
        return trainable_parameters(model)

    def loss(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None
    ) -> torch.Tensor:
        """The Trainer's loss of ``inputs`` (``compute_loss`` in its context manager).

        Every pass of a step replays the random draws of the step's start (see
        :class:`hf_extensions.perturbation.RandomState`). ``compute_loss`` gets a copy of the
        batch: it pops ``labels`` when label smoothing or ``compute_loss_func`` is used.
        """
        if self._random_state is not None:
            self._random_state.restore()
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        return loss

    def subset_scale(self, inputs: dict[str, Any], subset: dict[str, Any]) -> float | torch.Tensor:
        """Factor that makes the loss of ``subset`` a mean over its items, like a whole batch's.

        A loss normalised by ``num_items_in_batch`` is a sum over the subset divided by the item
        count of the accumulated batch; it is scaled up by items(batch) / items(subset), items
        counted as Trainer counts them (labels other than -100, shifted for causal LMs; rows
        when there are no labels). A per-batch mean needs nothing.
        """
        if not self._loss_scaled:
            return 1.0
        device = self.args.device
        whole = self._get_num_items_in_batch([inputs], device)
        part = self._get_num_items_in_batch([subset], device)
        if whole is None or part is None:
            return batch_rows(inputs) / batch_rows(subset)
        if isinstance(whole, torch.Tensor) or isinstance(part, torch.Tensor):
            # a 0-d tensor on the device: no host sync per step
            whole, part = (
                torch.as_tensor(whole, device=device),
                torch.as_tensor(part, device=device),
            )
            return whole.float() / part.float().clamp_min(1.0)
        return float(whole) / max(float(part), 1.0)

    def local_gradients(
        self, model: nn.Module, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, Tensors]:
        """Mean loss of ``inputs`` and its gradient on this process, ``p.grad`` untouched."""
        return local_gradients(
            lambda: self.loss(model, inputs),
            self.parameters_of(model),
            model=model,
            accelerator=self.accelerator,
            scaler=loss_scaler(self.accelerator),
        )

    def direction(self, model: nn.Module, grads: Tensors, rho: float) -> Tensors:
        """The configured ascent direction of radius ``rho`` (SAM or ASAM, global or per tensor).

        Under an fp16 GradScaler, a non-finite local gradient marks the step to be skipped.
        """
        if loss_scaler(self.accelerator) is not None and not gradients_finite(grads):
            self._overflow = True
        return ascent_direction(
            grads,
            self.parameters_of(model),
            rho=rho,
            adaptive=self.args.adaptive,
            adaptive_eta=self.args.adaptive_eta,
            norm=self.args.perturb_norm,
        )

    def perturbed(self, model: nn.Module, direction: Tensors) -> contextlib.AbstractContextManager:
        """Weights at ``theta + direction`` inside the block (BatchNorm statistics frozen)."""
        return perturbed_weights(
            self.parameters_of(model),
            direction,
            model=model,
            freeze_batchnorm_stats=self.args.freeze_batchnorm_stats,
        )

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of the final loss, weighted for the chunk and accumulation like Trainer's."""
        self.accelerator.backward(loss * self._chunk_weight)

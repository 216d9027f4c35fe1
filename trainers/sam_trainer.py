"""SAM and ASAM as a ``Trainer`` subclass."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hf_extensions.perturbation import direction_norm
from trainers.perturbation_trainer import PerturbationTrainer
from trainers.sam_config import SAMConfig


class SAMTrainer(PerturbationTrainer):
    """Sharpness-Aware Minimization (Foret et al., ICLR 2021) and ASAM (Kwon et al., ICML 2021).

    One step (Foret et al., Eq. 2 and Algorithm 1) on each chunk of ``sharpness_batch_size`` rows:

        g = ∇L(θ)                         local to the process (no all-reduce), p.grad untouched
        e = ρ g/‖g‖   (ASAM: ρ T²g/‖Tg‖, T = |θ| + η)
        ∇L(θ + e) is accumulated into p.grad (all-reduced by DDP at the sync step)

    then the Trainer's own clipping, optimizer and scheduler. ``rho=0`` is exactly the plain step.
    Logged: ``perturbation_norm`` and ``loss_at_weights`` (the loss at θ; the reported ``loss``
    is the loss at θ + e, the one SAM minimises).

    Departure from davda54/sam (the usual PyTorch SAM): the perturbation is undone by copying the
    saved weights back rather than by ``p.sub_(e)``, the ascent pass never all-reduces (under
    DDP each process perturbs by its own gradient, m-sharpness with m = the per-device batch, as
    in Foret et al.'s own data-parallel implementation), and fp16 gradients are unscaled by
    dividing by the GradScaler's scale instead of a second ``unscale_``.
    """

    method = "sam"
    paper = "Sharpness-Aware Minimization for Efficiently Improving Generalization"
    arxiv_id = "2010.01412"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, SAMConfig):
            raise TypeError(f"SAMTrainer needs a SAMConfig, got {type(self.args).__name__}.")
        if self.args.adaptive:
            self.method = "asam"
            self.paper = (
                "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant Learning of "
                "Deep Neural Networks"
            )
            self.arxiv_id = "2102.11600"

    def perturbed_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch
    ) -> torch.Tensor:
        clean_loss, grads = self.local_gradients(model, inputs)
        direction = self.direction(model, grads, self.args.rho)
        with self.perturbed(model, direction):
            loss = self.loss(model, inputs, num_items_in_batch)
            self.backward(loss)
        self.record(perturbation_norm=direction_norm(direction), loss_at_weights=clean_loss)
        return loss.detach()

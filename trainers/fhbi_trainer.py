"""FHBI (and SVGD, deep ensembles) over a :class:`hf_extensions.fhbi.particles.ParticleEnsemble`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from hf_extensions.atomic import atomic_save
from hf_extensions.fhbi.kernels import mean_pairwise_distance, particle_sq_distances, svgd_gradients
from hf_extensions.fhbi.particles import ParticleEnsemble
from hf_extensions.perturbation import (
    Tensors,
    ascent_direction,
    direction_norm,
    gradients_finite,
    loss_scaler,
    trainable_parameters,
)
from trainers.fhbi_config import FHBIConfig
from trainers.perturbation_trainer import PerturbationTrainer


class _KernelStep(TrainerCallback):
    """Rewrites the particles' gradients right before ``optimizer.step()`` (after all-reduce,
    accumulation and clipping): g' -> (1/m)[K g' - r]."""

    def __init__(self, trainer: FHBITrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.apply_kernel()


class FHBITrainer(PerturbationTrainer):
    """Flat Hilbert Bayesian Inference (Truong et al., ICML 2025, arXiv 2410.04196, Algorithm 1).

    The model is a :class:`ParticleEnsemble` of m particles θ_1..θ_m. One step, on each chunk of
    ``sharpness_batch_size`` rows (see :class:`PerturbationTrainer`)::

        g_i  = ∇_{θ_i} L_i(θ)                    local to the process, p.grad untouched
        ε_i  = ρ g_i / ‖g_i‖                     per particle (ascent_norm='particle') or per
                                                 tensor of the particle ('block'); the ONE
                                                 SAM-family mechanism, hf_extensions.perturbation
        g_i' = ∇_{θ_i} L_i(θ + ε)                second pass, accumulated into p.grad (DDP all-reduce)

    and right before the optimizer step (a Trainer callback, after accumulation, all-reduce and
    clipping), at the *unperturbed* particles::

        grad_i = (1/m) Σ_j [K_ij g_j' - ∇_{θ_j} K(θ_j, θ_i)]      (hf_extensions.fhbi.kernels)

    which the Trainer's optimizer and scheduler then use. Since the kernel mixing is linear in
    g' and K depends only on the (replicated) particles, mixing after the all-reduce equals
    mixing before it: data-parallel runs equal one process at the same global batch.

    The training loss is ``w · L + prior``: ``L`` is the mean over particles of their own
    cross-entropies (``likelihood="per_particle"``, the paper's per-particle posterior) or the
    cross-entropy of the particles' mean logits (``"ensemble_logits"``, the official code);
    ``w = m`` with ``likelihood_scale="particle"`` (default: each particle's likelihood gradient
    at the scale of one model's mean cross-entropy, the scale of the paper's per-particle
    posterior ∇ log p(θ_i | D) with the prior's 1/N) and ``w = 1`` with ``"official_code"``
    (the official code's loss exactly: CE of the mean logits, so each particle's likelihood
    gradient is about 1/m of one model's and the kernel's repulsion weighs m times more). The
    Gaussian prior term is added when ``prior_std`` is set. ``rho=0`` is SVGD (one pass);
    ``kernel="none"`` is a deep ensemble (K = I, no repulsion; with ``rho > 0``, m independent
    SAM models); m = 1 is SAM. Logged: ``perturbation_norm``, ``loss_at_weights`` (L at θ) and
    ``particle_distance`` (mean pairwise distance). The reported training ``loss`` is L at
    θ + ε (with ``rho=0``, at θ).

    Departures from the official code (tranquyenbk173/FHVI): the kernel-gradient term has the
    paper's repulsive sign (the code's sign and factor 2 attract particles; available as
    ``kernel_grad_sign="official_code"`` for reproduction only); the particles are evaluated
    together (stacked weights / vmap) instead of a loop; gradient clipping (``max_grad_norm``)
    applies to g' before the kernel mixing (the Trainer clips before its pre-step hook); the
    default likelihood weight is m times the official code's (``likelihood_scale="particle"``;
    ``"official_code"`` reproduces it; see ``benchmarks/fhbi.py`` for the measured comparison).
    """

    method = "fhbi"
    paper = "Improving Generalization with Flat Hilbert Bayesian Inference"
    arxiv_id = "2410.04196"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, FHBIConfig):
            raise TypeError(f"FHBITrainer needs an FHBIConfig, got {type(self.args).__name__}.")
        ensemble = self.accelerator.unwrap_model(self.model)
        if not isinstance(ensemble, ParticleEnsemble):
            raise TypeError(
                f"FHBITrainer trains a ParticleEnsemble, got {type(ensemble).__name__}: wrap the "
                "model with hf_extensions.fhbi.particles.ParticleEnsemble(model, num_particles)."
            )
        if ensemble.num_particles != self.args.num_particles:
            raise ValueError(
                f"The ensemble has {ensemble.num_particles} particles but `num_particles` is "
                f"{self.args.num_particles}."
            )
        self.add_callback(_KernelStep(self))

    @property
    def _likelihood_weight(self) -> float:
        """m for ``likelihood_scale="particle"`` (each particle's gradient at one model's scale),
        1 for ``"official_code"`` (the official code's loss, the mean over particles)."""
        return float(self.args.num_particles) if self.args.likelihood_scale == "particle" else 1.0

    def get_decay_parameter_names(self, model) -> list[str]:
        """Weight decay on the particle tensors whose template would get it (no biases or norms)."""
        ensemble = self.accelerator.unwrap_model(model)
        if not isinstance(ensemble, ParticleEnsemble):
            return super().get_decay_parameter_names(model)
        decayed = set(super().get_decay_parameter_names(ensemble.model))
        return [f"particles.{k}" for k, name in enumerate(ensemble.names) if name in decayed]

    # -- loss -------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training: Σ_i L_i (so that ∇_{θ_i} is particle i's own gradient); evaluation: the NLL
        of the particles' averaged probabilities (the model's ``loss``)."""
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs, return_particle_logits=True)
        logits = outputs["particle_logits"]
        m = logits.shape[0]
        if self.args.likelihood == "per_particle":  # mean over particles of their own CE
            loss = nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), labels.repeat(m), reduction="mean"
            )
        else:  # CE of the mean logits (official code)
            loss = nn.functional.cross_entropy(logits.mean(0).float(), labels)
        loss = loss * self._likelihood_weight
        if self.args.prior_std is not None:
            size = len(self.train_dataset) if self.train_dataset is not None else 1
            squares = sum(p.float().pow(2).sum() for p in trainable_parameters(model))
            loss = loss + squares / (2 * self.args.prior_std**2 * size)
        return (loss, outputs) if return_outputs else loss

    # -- the step ---------------------------------------------------------------------------

    def particle_direction(self, model: nn.Module, grads: Tensors) -> Tensors:
        """ε_i = ρ g_i / ‖g_i‖ for every particle i (its slice of each stacked tensor)."""
        if loss_scaler(self.accelerator) is not None and not gradients_finite(grads):
            self._overflow = True
        params = trainable_parameters(model)
        m = self.args.num_particles
        per_particle = [
            ascent_direction(
                [g[i] if g is not None else None for g in grads],
                [p[i] for p in params],
                rho=self.args.rho,
                adaptive=self.args.adaptive,
                adaptive_eta=self.args.adaptive_eta,
                norm="per_tensor" if self.args.ascent_norm == "block" else "global",
            )
            for i in range(m)
        ]
        return [
            torch.stack([d[t] for d in per_particle]) if grads[t] is not None else None
            for t in range(len(grads))
        ]

    def perturbed_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch
    ) -> torch.Tensor:
        scale = self._likelihood_weight  # reported losses: per particle, at one model's scale
        if self.args.rho == 0:  # SVGD / ensemble: the perturbation is zero, one pass suffices
            loss = self.loss(model, inputs, num_items_in_batch)
            self.backward(loss)
            self.record(loss_at_weights=loss.detach() / scale)
            return loss.detach() / scale
        clean_loss, grads = self.local_gradients(model, inputs)
        direction = self.particle_direction(model, grads)
        with self.perturbed(model, direction):
            loss = self.loss(model, inputs, num_items_in_batch)
            self.backward(loss)
        self.record(perturbation_norm=direction_norm(direction), loss_at_weights=clean_loss / scale)
        return loss.detach() / scale

    @torch.no_grad()
    def apply_kernel(self) -> None:
        """p.grad <- (1/m)[K p.grad - r] at the current (unperturbed) particles."""
        params = trainable_parameters(self.model)
        sq_dists = particle_sq_distances(params)
        self.record(particle_distance=mean_pairwise_distance(params, sq_dists))
        if self.args.kernel == "none":
            return
        grads = [p.grad for p in params]
        new = svgd_gradients(
            params,
            grads,
            bandwidth=self.args.kernel_bandwidth,
            scope=self.args.kernel_scope,
            sign=self.args.kernel_grad_sign,
            sq_dists=sq_dists if self.args.kernel_scope == "global" else None,
        )
        for p, g in zip(params, new):
            if g is not None:
                p.grad.copy_(g)

    # -- saving -----------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The Trainer's state dict (for exact resume) plus one PEFT adapter per particle, as one
        all-or-nothing save (:func:`hf_extensions.atomic.atomic_save`)."""
        if not self.args.should_save:
            super()._save(output_dir, state_dict)
            return
        with atomic_save(output_dir if output_dir is not None else self.args.output_dir) as stage:
            super()._save(str(stage), state_dict)
            self.accelerator.unwrap_model(self.model).save_pretrained(stage)

"""PGA: prompt gradient alignment for unsupervised domain adaptation, as a ``Trainer``.

Phan, Tran, Tran, Le, "Enhancing Domain Adaptation through Prompt Gradient Alignment", NeurIPS
2024 (arXiv 2406.09353). Each domain is one objective over CLIP prompts (a shared context and one
context per domain, :class:`hf_extensions.pga.clip_prompts.CLIPPromptLearner`); each domain's
gradient is taken at a point shifted so that descending it raises the alignment of the domains'
shared-prompt gradients and penalises their norms (:func:`pga_update`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import default_data_collator

from hf_extensions.perturbation import (
    NORM_EPS,
    RandomState,
    ascent_direction,
    combine_directions,
    gradients_finite,
    loss_scaler,
    perturbed_weights,
)
from trainers.method_trainer import MethodTrainer
from trainers.pga_config import PGAConfig

# ----------------------------------------------------------------------------- data


class PairedDomainDataset(torch.utils.data.Dataset):
    """Row ``i`` holds one example of every domain: ``{domain: {"pixel_values", "labels"}}``.

    ``domains`` maps a name to a dict of arrays / tensors (``pixel_values``, ``labels``) or to
    any indexable data set whose rows are such dicts (e.g. a ``datasets.Dataset`` with a
    transform that makes ``pixel_values``; rows are then read lazily). ``labels`` of ``-100``
    mean no label (an unconfident target pseudo-label). The length is the largest domain's; a
    smaller domain is cycled through a fixed seeded permutation, so the Trainer's shuffled
    sampler gives independent random batches of every domain (the official code draws source
    and target batches from two loaders).
    """

    def __init__(self, domains: Mapping[str, Any], *, seed: int = 0):
        if not domains:
            raise ValueError("`domains` must hold at least one domain.")
        # host: the data set's order, drawn on the host like any data loader's
        generator = torch.Generator().manual_seed(seed)
        self.domains = {
            # host: data rows live on the host; the Trainer moves batches
            name: {key: torch.as_tensor(data[key]) for key in ("pixel_values", "labels")}
            if isinstance(data, Mapping)
            else data
            for name, data in domains.items()
        }
        self.sizes = {
            name: len(data["labels"]) if isinstance(data, Mapping) else len(data)
            for name, data in self.domains.items()
        }
        if min(self.sizes.values()) == 0:
            raise ValueError(f"every domain needs at least one row, got sizes {self.sizes}.")
        self.length = max(self.sizes.values())
        self.orders = {  # host: as the generator above
            name: torch.randperm(size, generator=generator) for name, size in self.sizes.items()
        }

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for name, data in self.domains.items():
            row = int(self.orders[name][index % self.sizes[name]])
            if isinstance(data, Mapping):
                out[name] = {key: value[row] for key, value in data.items()}
            else:
                item = data[row]
                # host: data rows live on the host; the Trainer moves batches
                out[name] = {key: torch.as_tensor(item[key]) for key in ("pixel_values", "labels")}
        return out


class PairedDomainCollator:
    """Stacks rows of :class:`PairedDomainDataset` into ``{domain: {"pixel_values": [B, ...],
    "labels": [B]}}`` (``transformers.default_data_collator`` does not handle nested dicts).
    Flat rows (evaluation data sets) go to ``default_data_collator``."""

    def __call__(self, features: Sequence[Mapping[str, Any]]):
        if not all(isinstance(value, Mapping) for value in features[0].values()):
            return default_data_collator(list(features))
        return {
            domain: {
                # host: the collator runs on the host
                key: torch.stack([torch.as_tensor(row[domain][key]) for row in features])
                for key in features[0][domain]
            }
            for domain in features[0]
        }


# ----------------------------------------------------------------------------- the update


@dataclass
class PGAStep:
    """What :func:`pga_update` computed for one batch.

    Attributes:
        shared_grad: the gradient for ``θ_sh``.
        domain_grads: ``{domain: gradient for θ_domain}``.
        losses: each domain's loss at its shifted point (the loss at θ when ρ = α = 0).
        clean_losses: each domain's loss at θ.
        cosine: ``{source: cos(g_source^sh, g_target^sh)}`` at θ (empty without a target).
        shifts: ``{domain: {"rho": ‖ρ part‖, "align": ‖α part‖}}`` of the shift of ``θ_sh``
            (Euclidean norms; ``{}`` when ρ = α = 0). The α part is
            ``α Σ_other g_other^sh / (‖g_other^sh‖ ‖g_own^sh‖)``, of norm ``α / ‖g_own^sh‖`` with
            one other domain: it grows as the gradients shrink, unlike the ρ part (norm ρ).
    """

    shared_grad: torch.Tensor
    domain_grads: dict[str, torch.Tensor]
    losses: dict[str, torch.Tensor]
    clean_losses: dict[str, torch.Tensor]
    cosine: dict[str, float]
    shifts: dict[str, dict[str, float]] = field(default_factory=dict)


def _norm(tensor: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(tensor.detach().float()))


def pga_update(
    losses: Mapping[str, Callable[[], torch.Tensor]],
    shared: torch.Tensor,
    domain_params: Mapping[str, torch.Tensor],
    *,
    target: str | None,
    rho: float,
    align: float,
    tradeoff: float,
    random_state: RandomState | None = None,
    loss_scale: float = 1.0,
) -> PGAStep:
    """The PGA update of one batch (Phan et al., 2024, Algorithm 1; Eqs. 7-9).

    ``losses[d]()`` computes domain ``d``'s loss from ``shared`` (θ_sh) and ``domain_params[d]``
    (θ_d); ``target`` names the target domain, every other key is a source (``None``: no target,
    source-only tuning). With gradients ``g_d = ∇L_d(θ_sh, θ_d)`` at θ (one pass per domain)::

        target:   θ_T'  = θ_T  + ρ g_T^T/‖g_T^T‖
                  θ_sh' = θ_sh + ρ g_T^sh/‖g_T^sh‖ − α Σ_s g_s^sh / (‖g_s^sh‖ ‖g_T^sh‖)
        source s: θ_s'  = θ_s  + ρ g_s^s/‖g_s^s‖
                  θ_sh''= θ_sh + ρ g_s^sh/‖g_s^sh‖ − α g_T^sh / (‖g_T^sh‖ ‖g_s^sh‖)

    each domain's gradient ``G_d`` is taken at its own shifted point (one more pass per domain,
    weights restored exactly by :func:`hf_extensions.perturbation.perturbed_weights`), and

        grad θ_sh = G_T^sh + λ Σ_s G_s^sh,   grad θ_T = G_T^T,   grad θ_s = G_s^s.

    The ρ shifts are :func:`hf_extensions.perturbation.ascent_direction` with per-tensor norms.
    To first order in ρ and α, with λ = 1, this is the gradient of
    ``Σ_d L_d + ρ Σ_d (‖g_d^sh‖ + ‖g_d^d‖) − α Σ_s ⟨g_s^sh, g_T^sh⟩ / (‖g_s^sh‖ ‖g_T^sh‖)``
    with the norms of the alignment term held constant (the paper writes ``−α cos``; its
    update differentiates the inner product only, which ``tests/test_pga.py`` checks by finite
    differences). With ``ρ = α = 0`` only the first pass per domain runs (ERM, half the passes).

    Gradients come from ``torch.autograd.grad`` on the prompt tensors only; ``p.grad`` is not
    touched. Under fp16 the backward runs on the loss times ``loss_scale`` (the GradScaler's
    scale, so that small gradients do not underflow) and the scale is divided out: they are true
    gradients, so the alignment term is not divided by an fp16 loss scale (the official fp16
    variant's defect). If a scaled gradient at θ overflows, no shifted pass runs and the
    non-finite gradients are returned, for the GradScaler to skip the step and lower its scale. ``grad θ_s = G_s`` without λ, as in the
    official code (``LA/main.py``).
    """
    sources = [d for d in losses if d != target]
    order = ([target] if target is not None else []) + sources
    if target is not None and target not in losses:
        raise ValueError(f"no loss for the target domain {target!r}; domains: {list(losses)}")

    def grads_at(domain: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if random_state is not None:
            random_state.restore()
        loss = losses[domain]()
        params = (shared, domain_params[domain])
        grads = torch.autograd.grad(loss * loss_scale, params, allow_unused=True)
        return loss.detach(), [
            torch.zeros_like(p) if g is None else g / loss_scale for g, p in zip(grads, params)
        ]

    clean_losses, clean = {}, {}
    for domain in order:
        clean_losses[domain], clean[domain] = grads_at(domain)
    overflow = loss_scale != 1.0 and not gradients_finite([g for d in order for g in clean[d]])
    shared_norms = {d: _norm(clean[d][0]) for d in order}
    cosine = {}
    if target is not None and not overflow:
        for s in sources:
            dot = float((clean[s][0].double() * clean[target][0].double()).sum())
            cosine[s] = dot / (shared_norms[s] * shared_norms[target] + NORM_EPS)

    shifts: dict[str, dict[str, float]] = {}
    if overflow or (rho == 0 and align == 0):
        final, perturbed_losses = clean, dict(clean_losses)
    else:
        final, perturbed_losses = {}, {}
        for domain in order:
            params = [shared, domain_params[domain]]
            direction = ascent_direction(clean[domain], params, rho=rho, norm="per_tensor")
            shifts[domain] = {"rho": _norm(direction[0]), "align": 0.0}
            others = (sources if domain == target else [target]) if target is not None else []
            if align != 0 and others:
                aligned = torch.zeros_like(shared)
                for other in others:
                    scale = align / (shared_norms[other] * shared_norms[domain] + NORM_EPS)
                    aligned = aligned + scale * clean[other][0]
                    direction = combine_directions(
                        (1.0, direction), (-scale, [clean[other][0], None])
                    )
                shifts[domain]["align"] = _norm(aligned)
            with perturbed_weights(params, direction):
                perturbed_losses[domain], final[domain] = grads_at(domain)

    weights = {d: (1.0 if d == target else tradeoff) for d in order}
    if target is None:
        weights = {d: 1.0 for d in order}
    shared_grad = sum(weights[d] * final[d][0] for d in order)
    return PGAStep(
        shared_grad=shared_grad,
        domain_grads={d: final[d][1] for d in order},
        losses=perturbed_losses,
        clean_losses=clean_losses,
        cosine=cosine,
        shifts=shifts,
    )


# ----------------------------------------------------------------------------- the trainer


class PGATrainer(MethodTrainer):
    """``Trainer`` for PGA over a :class:`hf_extensions.pga.clip_prompts.CLIPPromptLearner`.

    Batches are ``{domain: {"pixel_values", "labels"}}`` (:class:`PairedDomainDataset` +
    :class:`PairedDomainCollator`, the default collator here); target labels are zero-shot
    pseudo-labels with ``-100`` where unconfident. Only ``training_step`` is overridden: it runs
    :func:`pga_update` and adds the result to ``p.grad``; the stock optimizer (AdamW), scheduler,
    clipping, accumulation, logging and saving follow. Evaluation batches are plain
    ``{"pixel_values", "labels"}``; the prediction averages the softmax of the domains' prompts.

    Image features come from the frozen image tower once per step and are reused by every pass
    (``cache_image_features``; the official code encodes the images again in each of its four
    passes). Baselines: ``pga_rho = pga_align = 0`` (ERM over source + pseudo-labelled target)
    and ``pga_source_only`` (prompts tuned on the sources; prediction from the source prompts).

    Data parallelism: the passes run on the unwrapped module (no DDP hooks: the gradients come
    from ``torch.autograd.grad``), the local directions are the process's own (as in SAM), and
    the final prompt gradients (a few thousand numbers) are averaged over processes explicitly
    before they are added to ``p.grad``.

    Logged: ``grad_cosine`` (mean over sources of cos(g_s^sh, g_T^sh) at θ; the official
    code's running mean is the mean of these logs), ``loss_<domain>`` (at the shifted points),
    and with ρ or α > 0 the sizes of the shifts of ``θ_sh`` relative to ``‖θ_sh‖`` (means over
    domains): ``rho_shift_rel`` and ``align_shift_rel`` (first order needs both ≪ 1).
    """

    method = "pga"
    paper = "Enhancing Domain Adaptation through Prompt Gradient Alignment"
    arxiv_id = "2406.09353"

    def __init__(self, *args, **kwargs):
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = PairedDomainCollator()
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, PGAConfig):
            raise TypeError(f"PGATrainer needs a PGAConfig, got {type(self.args).__name__}.")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("PGATrainer supports one device and DDP; not DeepSpeed or FSDP.")
        learner = self.model
        for name in ("shared_ctx", "domain_ctx", "domain_loss", "image_features"):
            if not hasattr(learner, name):
                raise TypeError(
                    "PGATrainer trains a CLIPPromptLearner (hf_extensions.pga.clip_prompts); the "
                    f"model has no `{name}`."
                )
        target = self.args.target_domain
        if target not in learner.domain_ctx:
            raise ValueError(
                f"`target_domain` {target!r} is not a domain of the prompt learner "
                f"({list(learner.domain_ctx)})."
            )
        sources = [d for d in learner.domain_ctx if d != target]
        if not sources:
            raise ValueError("the prompt learner needs at least one source domain.")
        if len(sources) > 1 and not self.args.multi_source:
            raise ValueError(
                f"the prompt learner has {len(sources)} source domains {sources}; set "
                "`multi_source=True` for the multi-source variant."
            )
        if (learner.n_ctx_shared, learner.n_ctx_domain) != (
            self.args.n_ctx_shared,
            self.args.n_ctx_domain,
        ):
            raise ValueError(
                f"the prompt learner has context lengths ({learner.n_ctx_shared}, "
                f"{learner.n_ctx_domain}); the config says ({self.args.n_ctx_shared}, "
                f"{self.args.n_ctx_domain})."
            )
        self.sources = sources
        if self.args.pga_source_only:
            learner.predict_domains = list(sources)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)
        learner = self.accelerator.unwrap_model(model)
        args = self.args
        target = None if args.pga_source_only else args.target_domain
        domains = ([target] if target is not None else []) + self.sources
        missing = [d for d in domains if d not in inputs]
        if missing:
            raise ValueError(f"the batch has no rows for domains {missing}; it has {list(inputs)}.")
        features = {}
        scaler = loss_scaler(self.accelerator)
        # The learner's methods are called on the unwrapped module, outside the prepared
        # model's forward where accelerate applies mixed precision: autocast explicitly.
        if args.cache_image_features:
            with self.compute_loss_context_manager(), self.accelerator.autocast():
                features = {d: learner.image_features(inputs[d]["pixel_values"]) for d in domains}

        def loss_of(domain: str) -> Callable[[], torch.Tensor]:
            def compute() -> torch.Tensor:
                with self.compute_loss_context_manager(), self.accelerator.autocast():
                    image = features.get(domain)
                    if image is None:
                        image = learner.image_features(inputs[domain]["pixel_values"])
                    return learner.domain_loss(image, inputs[domain]["labels"], domain)

            return compute

        step = pga_update(
            {d: loss_of(d) for d in domains},
            learner.shared_ctx,
            {d: learner.domain_ctx[d] for d in domains},
            target=target,
            rho=args.pga_rho,
            align=args.pga_align,
            tradeoff=args.pga_tradeoff,
            random_state=RandomState(),
            loss_scale=scaler.get_scale() if scaler is not None else 1.0,
        )
        params = [learner.shared_ctx, *(learner.domain_ctx[d] for d in domains)]
        grads = [step.shared_grad, *(step.domain_grads[d] for d in domains)]
        self._add_gradients(params, grads)
        if step.cosine:
            self.record(grad_cosine=float(np.mean(list(step.cosine.values()))))
        if step.shifts:
            size = _norm(learner.shared_ctx) + NORM_EPS
            for part in ("rho", "align"):
                values = [shift[part] / size for shift in step.shifts.values()]
                self.record(**{f"{part}_shift_rel": float(np.mean(values))})
        self.record(**{f"loss_{d}": step.losses[d] for d in domains})
        total = sum((1.0 if d == target else args.pga_tradeoff) * step.losses[d] for d in domains)
        return total.detach() / self.current_gradient_accumulation_steps

    def _add_gradients(self, params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
        """Average over processes, weight for accumulation (and the fp16 loss scale, which
        the GradScaler divides out again), and add into ``p.grad``.

        The scale goes on through ``scaler.scale``, which also initialises a GradScaler that no
        backward has used yet (its ``unscale_`` before clipping fails otherwise)."""
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        if self.accelerator.num_processes > 1:
            flat = self.accelerator.reduce(flat, reduction="mean")
        flat = flat / self.current_gradient_accumulation_steps
        scaler = loss_scaler(self.accelerator)
        if scaler is not None:
            flat = scaler.scale(flat)
        offset = 0
        for p in params:
            piece = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            if p.grad is None:
                p.grad = piece.clone()
            else:
                p.grad.add_(piece)

"""Diversity-enhanced deep mutual learning of Bayesian neural networks, as a ``Trainer``.

Pham et al., "Model and Feature Diversity for Bayesian Neural Networks in Mutual Learning",
NeurIPS 2023 (arXiv 2407.02721); the objective is written out in
:class:`trainers.BayesianMutualLearningConfig`. No official code was found; every form the paper
leaves open here is a config field.

Shape: the K peers live in one :class:`hf_extensions.bnn.PeerEnsemble` (one module), so the
stock ``Trainer`` owns one optimizer, the schedule, accumulation, mixed precision, DDP,
checkpointing and ``push_to_hub``. Only :meth:`compute_loss` is the method (it ``record``s the
loss terms, which :class:`~trainers.method_trainer.MethodTrainer` averages into the logs).
Besides, :meth:`_save` adds the ensemble's ``peer_ensemble.json`` next to the weights Trainer
writes (so a checkpoint reloads with ``PeerEnsemble.from_pretrained``),
``_set_signature_columns_if_needed`` keeps the dataset columns the *peers* accept (the ensemble's
``forward`` takes ``**inputs``), and :meth:`create_model_card` adds the number of peers.

Departures from DML's official recipe (Zhang et al. 2018 alternate peer updates within a step):
all peers step together on ``sum_k L_k`` with the other peers' terms detached, the usual
single-optimizer form; each peer's gradient is exactly its own ``L_k``'s. Gradient clipping
(``max_grad_norm``) uses one norm over all peers, as Trainer clips the whole model.

Gradient accumulation: every term is a per-micro-batch value (means over the micro-batch; the
KL / N and parameter-diversity terms once per micro-batch) and ``loss_is_scaled_for_ga = False``
lets Trainer divide by the number of micro-batches, so over an accumulated step the per-example
terms average and the per-step terms (KL / N, D_par) count exactly once: two micro-batches of b
give the same step as one batch of 2b (tested).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hf_extensions.atomic import atomic_save
from hf_extensions.bnn import (
    FlatPosterior,
    PeerEnsemble,
    flat_posterior,
    gaussian_divergence,
    gaussian_parameters,
)
from trainers.bnn_mutual_config import BayesianMutualLearningConfig
from trainers.method_trainer import MethodTrainer

__all__ = ["BayesianMutualLearningTrainer", "bound", "feature_divergence", "linear_cka"]


def bound(x: torch.Tensor, kind: str) -> torch.Tensor:
    """``x`` (``"none"``), ``min(x, 1)`` (``"clip"``: zero gradient past 1), ``x / (1 + x)``
    (``"saturating"``) or ``log(1 + x)`` (``"log"``)."""
    if kind == "none":
        return x
    if kind == "clip":
        return x.clamp(max=1.0)
    if kind == "saturating":
        return x / (1 + x)
    if kind == "log":
        return torch.log1p(x)
    raise ValueError(f"unknown bound {kind!r}.")


def linear_cka(f_k: torch.Tensor, f_j: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Linear centred-kernel alignment of two feature matrices ``[B, D_k]``, ``[B, D_j]``.

    Kornblith, Norouzi, Lee, Hinton, "Similarity of Neural Network Representations Revisited",
    ICML 2019 (arXiv 1905.00414), Eq. 5 with linear kernels: with the rows centred,
    ``CKA = <K_k, K_j>_F / (||K_k||_F ||K_j||_F)`` for the Gram matrices ``K = F F^T`` of the
    batch. In [0, 1]; invariant to orthogonal maps (rotations, permutations) and isotropic scaling
    of either feature space, so the two peers' channels need not correspond.
    """
    f_k = f_k - f_k.mean(0, keepdim=True)
    f_j = f_j - f_j.mean(0, keepdim=True)
    gram_k, gram_j = f_k @ f_k.T, f_j @ f_j.T
    cross = (gram_k * gram_j).sum()
    return cross / (gram_k.pow(2).sum().sqrt() * gram_j.pow(2).sum().sqrt() + eps)


def feature_divergence(
    f_k: torch.Tensor, f_j: torch.Tensor, kind: str, temperature: float = 1.0
) -> torch.Tensor:
    """A divergence between fused features ``[B, D]`` of two peers (a mean over the batch).

    ``"cka"``: ``1 - linear_cka(F_k, F_j)`` (a batch-level comparison, not a per-example mean);
    ``"cosine"``: ``1 - cos(F_k, F_j)``; ``"jensen_shannon"``: JS between ``softmax(F / tau)``;
    ``"kl"``: ``KL(softmax(F_j / tau) || softmax(F_k / tau))``.
    """
    if kind == "cka":
        return 1 - linear_cka(f_k, f_j)
    if kind == "cosine":
        return (1 - F.cosine_similarity(f_k, f_j, dim=-1)).mean()
    log_k = F.log_softmax(f_k / temperature, dim=-1)
    log_j = F.log_softmax(f_j / temperature, dim=-1)
    if kind == "kl":
        return F.kl_div(log_k, log_j, log_target=True, reduction="batchmean")
    if kind == "jensen_shannon":
        log_m = torch.logsumexp(torch.stack([log_k, log_j]), dim=0) - math.log(2)
        return 0.5 * (
            F.kl_div(log_m, log_k, log_target=True, reduction="batchmean")
            + F.kl_div(log_m, log_j, log_target=True, reduction="batchmean")
        )
    raise ValueError(f"unknown feature divergence {kind!r}.")


def _others(k: int, count: int) -> list[int]:
    return [j for j in range(count) if j != k]


def _detached(item):
    """``item`` with no gradient: a tensor, or a :class:`FlatPosterior`."""
    if isinstance(item, FlatPosterior):
        return FlatPosterior(item.mu.detach(), item.sigma.detach(), item.prior_mean, item.prior_std)
    return item.detach()


class BayesianMutualLearningTrainer(MethodTrainer):
    """``Trainer`` for :class:`~hf_extensions.bnn.PeerEnsemble` models (see module docstring).

    Training mode minimises ``sum_k L_k``; evaluation (``evaluate``/``predict``) scores the
    Bayesian model average over ``mc_samples`` draws of every peer, and its ``eval_loss`` is the
    NLL of that average.

    The trainer sets on the ensemble, from its config: ``mc_samples``, and the feature layers
    (captured only when ``feature_diversity_weight > 0``).
    """

    method: ClassVar[str] = "bnn-mutual-learning"
    paper: ClassVar[str] = (
        "Model and Feature Diversity for Bayesian Neural Networks in Mutual Learning"
    )
    arxiv_id: ClassVar[str] = "2407.02721"
    # compute_loss returns per-micro-batch means: Trainer divides by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.args
        if not isinstance(config, BayesianMutualLearningConfig):
            raise TypeError(
                f"{type(self).__name__} needs a BayesianMutualLearningConfig, got "
                f"{type(config).__name__}."
            )
        ensemble = self.model
        if not isinstance(ensemble, PeerEnsemble):
            raise TypeError(
                f"{type(self).__name__} trains a hf_extensions.bnn.PeerEnsemble (the peers "
                f"in one module), got {type(ensemble).__name__}."
            )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                f"{type(self).__name__} supports one device and DDP; DeepSpeed and FSDP shard the "
                "parameters that the KL and parameter-diversity terms read whole."
            )
        peers = list(ensemble.peers)
        self._has_gaussian = [bool(gaussian_parameters(peer)) for peer in peers]
        if config.parameter_diversity_weight > 0:
            params = [gaussian_parameters(peer) for peer in peers]
            if not all(params):
                raise ValueError(
                    "`parameter_diversity_weight` > 0 needs Bayesian peers (convert_to_bayesian)."
                )
            shapes = [[(n, tuple(mu.shape)) for n, mu, _ in p] for p in params]
            if any(s != shapes[0] for s in shapes):
                raise ValueError(
                    "`parameter_diversity_weight` > 0 needs peers with the same Gaussian layers "
                    "(same architecture, converted the same way)."
                )
        if config.feature_diversity_weight > 0:
            ensemble.set_feature_layers(config.feature_layers or ensemble.feature_layers or "auto")
        else:
            ensemble.set_feature_layers(None)
        ensemble.mc_samples = config.mc_samples
        self._dataset_size = config.kl_dataset_size
        if self._dataset_size is None and self.train_dataset is not None:
            try:
                self._dataset_size = len(self.train_dataset)
            except TypeError:
                self._dataset_size = None

    # -- the objective --------------------------------------------------------------------------

    def _n(self) -> int:
        if self._dataset_size is None:
            raise ValueError(
                "the KL / N term needs N: set `kl_dataset_size` (the train dataset has no length)."
            )
        return self._dataset_size

    def parameter_diversity(self, q_k: FlatPosterior, q_j: FlatPosterior) -> torch.Tensor:
        """Bounded ``D_par(q_k, q_j)`` (see :class:`BayesianMutualLearningConfig`); no detaching
        (the unit ``u_i`` is detached: the term moves the posteriors, not its own yardstick)."""
        config = self.args
        sigma_k, sigma_j = q_k.sigma.float(), q_j.sigma.float()
        d = gaussian_divergence(
            q_k.mu.float(), sigma_k, q_j.mu.float(), sigma_j, config.parameter_divergence
        )
        if (
            config.parameter_divergence == "wasserstein"
            and config.parameter_diversity_units == "posterior_std"
        ):
            d = d / (0.5 * (sigma_k.detach() ** 2 + sigma_j.detach() ** 2))
        if config.parameter_diversity_scale != 1.0:
            d = d / config.parameter_diversity_scale**2
        total = bound(d, config.parameter_diversity_bound).sum()
        if config.parameter_diversity_normalization == "dataset_size":
            return total / self._n()
        return total / d.numel()

    def feature_diversity(self, f_k: torch.Tensor, f_j: torch.Tensor) -> torch.Tensor:
        """Bounded ``D_feat(F_k, F_j)``; no detaching."""
        config = self.args
        value = feature_divergence(f_k, f_j, config.feature_divergence, config.feature_temperature)
        return bound(value, config.feature_diversity_bound)

    @staticmethod
    def _peer_terms(divergence, items: Sequence, symmetric: bool) -> list[torch.Tensor]:
        """``t_k = mean_{j != k} D(x_k, sg(x_j))`` for every peer k, as loss contributions.

        The gradient of ``sum_k t_k`` reaches each ``x_k`` through its own term only. For a
        symmetric ``D`` that equals the gradient of ``sum_{pairs} D(x_a, x_b)`` without any
        detaching, so each pair is evaluated once and split as ``D + sg(D)`` (value 2D, gradient
        of D) over its two peers: half the work, same values and gradients.
        """
        count = len(items)
        if symmetric:
            values: list[torch.Tensor] = [0.0] * count  # type: ignore[list-item]
            for a in range(count):
                for b in range(a + 1, count):
                    d = divergence(items[a], items[b])
                    values[a] = values[a] + d
                    values[b] = values[b] + d.detach()
            return [v / (count - 1) for v in values]
        return [
            sum(divergence(items[k], _detached(items[j])) for j in _others(k, count)) / (count - 1)
            for k in range(count)
        ]

    def mutual_learning_loss(
        self,
        peer_logits: torch.Tensor,
        labels: torch.Tensor,
        peer_features: torch.Tensor | None,
        ensemble: PeerEnsemble,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``sum_k L_k`` and the per-term means over peers (for logging)."""
        config = self.args
        logits = peer_logits.float()
        count = logits.shape[0]
        temperature = config.mutual_temperature
        use_kl = config.kl_weight > 0
        use_par = config.parameter_diversity_weight > 0 and count > 1
        use_feat = config.feature_diversity_weight > 0 and count > 1
        use_mutual = config.mutual_weight > 0 and count > 1
        posteriors = [
            flat_posterior(peer) if has and (use_kl or use_par) else None
            for peer, has in zip(ensemble.peers, self._has_gaussian)
        ]
        terms: dict[str, list[torch.Tensor]] = defaultdict(list)
        per_peer: list[torch.Tensor] = []
        for k in range(count):
            ce = F.cross_entropy(logits[k], labels, label_smoothing=config.label_smoothing_factor)
            terms["ce"].append(ce)
            per_peer.append(ce)
        if use_kl:
            for k, posterior in enumerate(posteriors):
                if posterior is not None:
                    kl = posterior.kl() / self._n()
                    terms["kl"].append(kl)
                    per_peer[k] = per_peer[k] + config.kl_weight * kl
        if use_mutual:
            log_p = F.log_softmax(logits / temperature, dim=-1)
            for k in range(count):
                mutual = sum(
                    F.kl_div(log_p[k], log_p[j].detach(), log_target=True, reduction="batchmean")
                    for j in _others(k, count)
                ) * (temperature**2 / (count - 1))
                terms["mutual"].append(mutual)
                per_peer[k] = per_peer[k] + config.mutual_weight * mutual
        if use_par:
            symmetric = config.parameter_divergence == "wasserstein"
            values = self._peer_terms(self.parameter_diversity, posteriors, symmetric)
            for k, value in enumerate(values):
                terms["parameter_diversity"].append(value)
                per_peer[k] = per_peer[k] - config.parameter_diversity_weight * value
        if use_feat:
            symmetric = config.feature_divergence != "kl"
            feats = list(peer_features.float())
            values = self._peer_terms(self.feature_diversity, feats, symmetric)
            for k, value in enumerate(values):
                terms["feature_diversity"].append(value)
                per_peer[k] = per_peer[k] - config.feature_diversity_weight * value
        total = torch.stack(per_peer).sum()
        logged = {name: torch.stack(values).detach().mean() for name, values in terms.items()}
        return total, logged

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch=None,
    ):
        """Training: ``sum_k L_k`` (a per-micro-batch mean). Evaluation: NLL of the BMA."""
        outputs = model(**inputs)
        if not model.training:
            loss = outputs["loss"]
            return (loss, outputs) if return_outputs else loss
        if "labels" not in inputs:
            raise ValueError("the training batch has no `labels`.")
        ensemble = self.accelerator.unwrap_model(model)
        loss, terms = self.mutual_learning_loss(
            outputs["peer_logits"], inputs["labels"], outputs.get("peer_features"), ensemble
        )
        self.record(**terms)
        return (loss, outputs) if return_outputs else loss

    # -- columns, saving, logging, model card ---------------------------------------------------

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the dataset columns the peers' ``forward`` accept (the ensemble takes ``**inputs``)."""
        if self._signature_columns is None:
            model = self.accelerator.unwrap_model(self.model)
            names = model.input_names() if isinstance(model, PeerEnsemble) else []
            self._signature_columns = [*names, "label", "label_ids", *self.label_names]

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Trainer's save (weights as safetensors), plus ``peer_ensemble.json`` to rebuild the
        peers, as one all-or-nothing save (:func:`hf_extensions.atomic.atomic_save`)."""
        model = self.accelerator.unwrap_model(self.model)
        if not (self.args.should_save and isinstance(model, PeerEnsemble)):
            super()._save(output_dir, state_dict=state_dict)
            return
        with atomic_save(output_dir if output_dir is not None else self.args.output_dir) as stage:
            super()._save(str(stage), state_dict=state_dict)
            model.save_config(stage)

    def card_hyperparameters(self) -> dict:
        """:class:`MethodTrainer`'s, with the number of peers."""
        hyperparameters = super().card_hyperparameters()
        model = self.accelerator.unwrap_model(self.model)
        if isinstance(model, PeerEnsemble):
            hyperparameters["num_peers"] = len(model.peers)
        return hyperparameters

    def card_base_model(self) -> str | None:
        """The peers' base model (the ensemble itself has no config)."""
        model = self.accelerator.unwrap_model(self.model)
        first = model.peers[0] if isinstance(model, PeerEnsemble) else model
        return getattr(getattr(first, "config", None), "_name_or_path", None) or None

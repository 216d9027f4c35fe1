"""Conformance case of BNN mutual learning (``BayesianMutualLearningTrainer`` over a
``PeerEnsemble`` of Bayesian networks). Baseline: one Gaussian (Bayesian) peer with
``kl_weight=0`` and no peer terms, under one frozen weight draw, equals the stock ``Trainer``
on the same Bayesian network; the control turns the KL / N term on. Reload: 2 Bayesian ViT
peers; two processes: every term on."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from conformance.case import (
    DDP_STEP,
    QUIET,
    REAL_STEP,
    TRAINING,
    Baseline,
    CardSpec,
    Case,
    Ranks,
    Saved,
    bad,
    bad_values,
    digits,
    fit,
    params,
    probe_pixels,
    saved_trainer,
)
from hf_extensions.bnn import PeerEnsemble, convert_to_bayesian, fixed_noise
from hf_extensions.models import tiny_mlp_classifier
from hf_extensions.models import tiny_vit_classifier as vit
from trainers.bnn_mutual_config import BayesianMutualLearningConfig
from trainers.bnn_mutual_trainer import BayesianMutualLearningTrainer


def _bnn_baseline(tmp_path: Path) -> Baseline:
    """One Gaussian (Bayesian) peer, ``kl_weight=0`` and no peer terms, under one frozen weight
    draw: the stock ``Trainer`` on the same Bayesian network. Control: the KL / N term on."""

    def peer():
        return convert_to_bayesian(tiny_mlp_classifier()).train()

    data = digits("vector", 32)
    stock = peer()
    args = TrainingArguments(str(tmp_path / "stock"), **QUIET, **REAL_STEP)
    with fixed_noise(stock, seed=0):
        Trainer(model=stock, args=args, train_dataset=data).train()
    result = Baseline({}, params(stock), {}, params(peer()))
    for name, kl_weight in (("method", 0.0), ("control", 1.0)):
        ensemble = PeerEnsemble([peer()])
        config = BayesianMutualLearningConfig(
            output_dir=str(tmp_path / name),
            kl_weight=kl_weight,
            mutual_weight=0.0,
            parameter_diversity_weight=0.0,
            feature_diversity_weight=0.0,
            **QUIET,
            **REAL_STEP,
        )
        trainer = BayesianMutualLearningTrainer(model=ensemble, args=config, train_dataset=data)
        with fixed_noise(ensemble, seed=0):
            trainer.train()
        setattr(result, name, params(ensemble.peers[0]))
    return result


BNN_CARD = {
    "kl_weight": 0.5,
    "mutual_weight": 0.5,
    "mutual_temperature": 2.0,
    "parameter_diversity_weight": 0.1,
    "feature_diversity_weight": 0.2,
    "feature_divergence": "jensen_shannon",
    "feature_layers": ["vit.layers.0", "classifier:input"],
    "mc_samples": 2,
}


def _bnn_peers() -> PeerEnsemble:
    return PeerEnsemble([convert_to_bayesian(vit(seed=k)).train() for k in range(2)])


def _bnn_outputs(ensemble: PeerEnsemble):
    """Every peer's logits and the model average (training-mode forward: one pass per peer)
    under one frozen weight draw (the same in both processes), and the evaluation output (the
    average over ``mc_samples`` draws, all equal here)."""
    probe = probe_pixels()
    with torch.no_grad(), fixed_noise(ensemble, seed=3):
        out = ensemble.train()(pixel_values=probe)
        average = ensemble.eval()(pixel_values=probe).logits
    return {"logits": out.logits, "peer_logits": out.peer_logits, "evaluation": average}


def _bnn_save(directory: Path) -> Saved:
    ensemble = _bnn_peers()
    args = BayesianMutualLearningConfig(
        output_dir=str(directory), **{**QUIET, **REAL_STEP, "max_steps": 2, **BNN_CARD}
    )
    trainer = BayesianMutualLearningTrainer(
        model=ensemble, args=args, train_dataset=digits("image", 32)
    )
    fit(trainer)
    return saved_trainer(trainer, directory, _bnn_outputs(ensemble))


def _bnn_reload(directory: Path):
    return _bnn_outputs(PeerEnsemble.from_pretrained(directory))


def _bnn_ranks(output_dir: str, variant: str):
    """Two Bayesian ViT peers, every term on: 2 x 16 == 1 x 32 (each rank draws the weights the
    single process draws; KL / N and the parameter term are counted once by the all-reduce)."""
    torch.manual_seed(0)
    ensemble = _bnn_peers()
    initial = params(ensemble)
    args = BayesianMutualLearningConfig(
        output_dir=output_dir,
        per_device_train_batch_size={"two": 16, "one": 32}[variant],
        **{**QUIET, **DDP_STEP, "learning_rate": 0.1, **BNN_CARD},
    )
    trainer = BayesianMutualLearningTrainer(
        model=ensemble, args=args, train_dataset=digits("image", 96)
    )
    trainer.train()
    return {"steps": trainer.state.global_step}, initial, params(ensemble)


_BNN_BASE = {**TRAINING, "feature_layers": ["net.1"]}
BNN = Case(
    id="bnn-mutual-learning",
    baseline=_bnn_baseline,
    save=_bnn_save,
    reload=_bnn_reload,
    card=CardSpec(
        "bnn-mutual-learning",
        "Model and Feature Diversity for Bayesian Neural Networks in Mutual Learning",
        "2407.02721",
        "transformers",
        BayesianMutualLearningConfig,
        BNN_CARD,
    ),
    bad_configs=(
        *bad_values(
            BayesianMutualLearningConfig,
            _BNN_BASE,
            [
                ("kl_weight", -1.0),
                ("kl_dataset_size", 0),
                ("mutual_weight", -0.1),
                ("mutual_temperature", 0.0),
                ("parameter_diversity_weight", -1.0),
                ("parameter_divergence", "bures"),
                ("parameter_diversity_bound", "none"),
                ("parameter_diversity_scale", 0.0),
                ("parameter_diversity_normalization", "batch"),
                ("feature_diversity_weight", -1.0),
                ("feature_divergence", "l2"),
                ("feature_diversity_bound", "clip"),
                ("feature_temperature", -1.0),
                ("feature_layers", []),
                ("mc_samples", 0),
            ],
        ),
        bad(
            "feature_diversity_bound",
            lambda: BayesianMutualLearningConfig(
                **_BNN_BASE, feature_divergence="kl", feature_diversity_bound="none"
            ),
            "none",
        ),
    ),
    ranks=Ranks(_bnn_ranks),
)

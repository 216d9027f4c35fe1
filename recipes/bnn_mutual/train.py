"""BNN mutual-learning recipe: train K Bayesian peers with :class:`trainers.BayesianMutualLearningTrainer`.

Pham et al., "Model and Feature Diversity for Bayesian Neural Networks in Mutual Learning",
NeurIPS 2023 (arXiv 2407.02721). Each peer is a ``transformers`` image classifier converted to a
mean-field Gaussian BNN (:func:`hf_extensions.bnn.convert_to_bayesian`); the peers live in
one :class:`hf_extensions.bnn.PeerEnsemble`, which the stock ``Trainer`` machinery trains,
evaluates (the Bayesian model average over ``mc_samples`` draws per peer) and saves.

Embedded default (offline, CPU, about a minute): two tiny ViT BNNs on scikit-learn's digits::

    accelerate launch recipes/bnn_mutual/train.py --config recipes/bnn_mutual/digits.yaml

Baselines are the same script with other weights: DML
(``--parameter_diversity_weight 0 --feature_diversity_weight 0``), independent BNNs (also
``--mutual_weight 0``).

Two CPU processes (data parallel over gloo)::

    accelerate launch --config_file recipes/accelerate_configs/cpu_2proc.yaml \\
        recipes/bnn_mutual/train.py --config recipes/bnn_mutual/digits.yaml

Paper scale (needs Hub access and GPUs): ResNet-style peers on CIFAR-100, means and MOPED
standard deviations (sigma = delta |w|) from a deterministic checkpoint (see the README)::

    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml \\
        recipes/bnn_mutual/train.py --config recipes/bnn_mutual/cifar100_resnet.yaml

Every field of ``BayesianPeersArguments``, ``ImageClassificationArguments`` and
``BayesianMutualLearningConfig`` (which includes ``TrainingArguments``) can be set in the YAML or
on the command line; ``--help`` lists them. The output folder holds ``model.safetensors`` +
``peer_ensemble.json`` (reload with ``PeerEnsemble.from_pretrained(output_dir)``) and a model card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from hf_extensions.bnn import (
    ESTIMATORS,
    PRIOR_MEANS,
    PeerEnsemble,
    convert_to_bayesian,
    peer_distance,
)
from hf_extensions.cli import (
    CLASSIFICATION_SUMMARY,
    RecipeArgumentParser,
    run_as_script,
    trainer_artifact,
)
from hf_extensions.demo import Comparison, run_comparison
from hf_extensions.models import tiny_vit_classifier
from hf_extensions.models.image_classification import (
    ImageClassificationArguments,
    build_model,
    train_image_classifier,
)
from hf_extensions.validation import check_choice, check_integer, check_positive
from trainers.bnn_mutual_config import BayesianMutualLearningConfig
from trainers.bnn_mutual_trainer import BayesianMutualLearningTrainer

RECIPE_DIR = Path(__file__).resolve().parent


@dataclass
class BayesianPeersArguments:
    """How many peers, and how each deterministic model becomes a BNN."""

    num_peers: int = field(default=2, metadata={"help": "Number of peer BNNs (the paper: 2)."})
    prior_std: float = field(default=1.0, metadata={"help": "Std of the Gaussian prior."})
    posterior_rho_init: float = field(
        default=-3.0, metadata={"help": "Initial rho, sigma = softplus(rho) (unless MOPED)."}
    )
    moped_delta: float | None = field(
        default=None,
        metadata={"help": "MOPED: initial sigma = delta * |w| of the deterministic weights."},
    )
    prior_mean: str = field(
        default="zero",
        metadata={
            "help": "Prior mean: 'zero' or 'pretrained' (the deterministic weights).",
            "choices": PRIOR_MEANS,
        },
    )
    estimator: str = field(
        default="reparameterization",
        metadata={"help": "Gradient estimator of the Gaussian layers.", "choices": ESTIMATORS},
    )
    exclude_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules kept deterministic (e.g. classifier)."}
    )

    def __post_init__(self):
        check_integer("num_peers", self.num_peers, low=1)
        check_positive("prior_std", self.prior_std)
        if self.moped_delta is not None:
            check_positive("moped_delta", self.moped_delta)
        check_choice("prior_mean", self.prior_mean, PRIOR_MEANS)
        check_choice("estimator", self.estimator, ESTIMATORS)


def build_peers(
    peer_args: BayesianPeersArguments,
    script_args: ImageClassificationArguments,
    names: list[str],
    seed: int,
) -> PeerEnsemble:
    """``num_peers`` deterministic classifiers, each converted to a BNN, in one ensemble.

    Tiny ViTs (no checkpoint) get different initial weights per peer (seed ``1000 seed + k``); a
    checkpoint gives every peer the same means (the paper's starred setting) and, through the
    global seed, a different new head where the head is replaced.
    """
    peers = []
    for k in range(peer_args.num_peers):
        if script_args.model_name_or_path is None:
            model = tiny_vit_classifier(
                num_labels=len(names),
                image_size=script_args.image_size,
                patch_size=script_args.patch_size,
                num_channels=script_args.num_channels,
                hidden_size=script_args.hidden_size,
                num_layers=script_args.num_layers,
                seed=1000 * seed + k,
            )
        else:
            torch.manual_seed(1000 * seed + k)
            model = build_model(script_args, names)
        convert_to_bayesian(
            model,
            prior_std=peer_args.prior_std,
            posterior_rho_init=peer_args.posterior_rho_init,
            moped_delta=peer_args.moped_delta,
            prior_mean=peer_args.prior_mean,
            estimator=peer_args.estimator,
            exclude_modules=peer_args.exclude_modules or (),
        )
        peers.append(model.train())
    return PeerEnsemble(peers)


def main(
    argv: list[str] | None = None,
) -> tuple[BayesianMutualLearningTrainer, dict[str, float]]:
    """Train, evaluate the Bayesian model average on the test split, save with a model card."""
    parser = RecipeArgumentParser(
        (BayesianPeersArguments, ImageClassificationArguments, BayesianMutualLearningConfig)
    )
    peer_args, script_args, config = parser.parse(argv)

    def peers(names: list[str]) -> PeerEnsemble:
        return build_peers(peer_args, script_args, names, config.seed)

    trainer, metrics = train_image_classifier(
        BayesianMutualLearningTrainer, script_args, config, peers
    )
    model = trainer.accelerator.unwrap_model(trainer.model)
    trained = model.peers  # one peer: no distance (nan)
    metrics["test_peer_distance"] = (
        peer_distance(*trained[:2]) if len(trained) > 1 else float("nan")
    )
    return trainer, metrics


#: The classification figures of the peers' average, and how far apart two peers ended.
SUMMARY = {**CLASSIFICATION_SUMMARY, "peer distance (W2^2 per weight)": "test_peer_distance"}


def demo() -> Comparison:
    """Two BNN peers from the zoo's ViT (MOPED) on held-out styles, beside deep mutual learning
    (the diversity weights 0: the baseline of the paper's claim and of the evidence benchmark);
    test metrics of their average."""
    off = ("parameter_diversity_weight", "feature_diversity_weight")
    return run_comparison(
        method=main,
        baseline_name="DML (diversity weights 0)",
        baseline_flags=[item for name in off for item in (f"--{name}", "0")],
        config=RECIPE_DIR / "zoo_vit.yaml",
        summary=SUMMARY,
        lower_is_better=("test NLL", "test ECE"),
        fixture="vit",
    )


def artifact(result):
    """The saved model and the line that loads it (printed at the end of a run)."""
    return trainer_artifact(result[0])


if __name__ == "__main__":
    run_as_script(main, SUMMARY, artifacts=artifact)

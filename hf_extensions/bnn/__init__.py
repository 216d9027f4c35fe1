"""Bayesian neural networks in mutual learning with model and feature diversity (BNN method).

Pham et al., "Model and Feature Diversity for Bayesian Neural Networks in Mutual Learning",
NeurIPS 2023 (arXiv 2407.02721). The trainer is :class:`trainers.BayesianMutualLearningTrainer`;
its machinery lives here:

- :mod:`~hf_extensions.bnn.layers`: mean-field Gaussian layers (Bayes by Backprop, Flipout,
  MOPED) and :func:`convert_to_bayesian`;
- :mod:`~hf_extensions.bnn.posterior`: KL to the prior, Gaussian divergences between peers,
  posterior-mean and frozen-noise evaluation;
- :mod:`~hf_extensions.bnn.peers`: :class:`PeerEnsemble` (the K peers in one module) and the
  fused multi-stage features of the feature-diversity term.
"""

from hf_extensions.bnn.layers import (
    ESTIMATORS,
    PRIOR_MEANS,
    BayesianConv2d,
    BayesianLayer,
    BayesianLinear,
    bayesian_layers,
    convert_to_bayesian,
    rho_from_sigma,
)
from hf_extensions.bnn.peers import PeerEnsemble, PeerEnsembleOutput, fuse_features
from hf_extensions.bnn.posterior import (
    GAUSSIAN_DIVERGENCES,
    FlatPosterior,
    fixed_noise,
    flat_posterior,
    gaussian_divergence,
    gaussian_parameters,
    kl_divergence,
    peer_distance,
    posterior_mean,
)

__all__ = [
    "ESTIMATORS",
    "GAUSSIAN_DIVERGENCES",
    "PRIOR_MEANS",
    "BayesianConv2d",
    "BayesianLayer",
    "BayesianLinear",
    "FlatPosterior",
    "PeerEnsemble",
    "PeerEnsembleOutput",
    "bayesian_layers",
    "convert_to_bayesian",
    "fixed_noise",
    "flat_posterior",
    "fuse_features",
    "gaussian_divergence",
    "gaussian_parameters",
    "kl_divergence",
    "peer_distance",
    "posterior_mean",
    "rho_from_sigma",
]

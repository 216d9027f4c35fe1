"""The BNN mutual-learning recipe: YAML + CLI parsing, training, saved ensemble, card."""

from pathlib import Path

import pytest
import torch

from hf_extensions.bnn import BayesianConv2d, PeerEnsemble, bayesian_layers
from hf_extensions.hub import read_model_card_metadata
from recipes.bnn_mutual.train import main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "bnn_mutual"


def test_recipe_trains_saves_and_reloads_the_peers(tmp_path):
    trainer, metrics = main(
        [
            "--config",
            str(RECIPE / "digits.yaml"),
            "--output_dir",
            str(tmp_path),
            "--max_steps",
            "3",
            "--mc_samples",
            "2",
            "--logging_steps",
            "1",
        ]
    )
    assert {"test_accuracy", "test_nll", "test_ece", "test_peer_distance"} <= set(metrics)
    ensemble = trainer.model
    assert len(ensemble.peers) == 2 and ensemble.mc_samples == 2
    assert ensemble.feature_layers == ["vit.layers.0", "vit.layers.1", "classifier:input"]
    assert any(isinstance(layer, BayesianConv2d) for _, layer in bayesian_layers(ensemble))
    assert "feature_diversity" in trainer.state.log_history[0]
    loaded = PeerEnsemble.from_pretrained(tmp_path)
    reference = ensemble.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in loaded.state_dict().items())
    card = read_model_card_metadata(tmp_path)
    assert card["method"] == "bnn-mutual-learning"
    assert card["hyperparameters"]["num_peers"] == 2
    assert "test_accuracy" in card["metrics"]


def test_recipe_peers_start_different_and_moped_sets_sigma(tmp_path):
    from hf_extensions.models.image_classification import ImageClassificationArguments
    from recipes.bnn_mutual.train import BayesianPeersArguments, build_peers

    peers = build_peers(
        BayesianPeersArguments(moped_delta=0.1),
        ImageClassificationArguments(),
        list("0123456789"),
        0,
    ).peers
    a, b = (p.vit.embeddings.patch_embeddings.projection for p in peers)
    assert not torch.equal(a.weight, b.weight)
    sigma = torch.nn.functional.softplus(a.weight_rho)
    torch.testing.assert_close(sigma, 0.1 * a.weight.abs(), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="num_peers"):
        BayesianPeersArguments(num_peers=0)


def test_paper_config_parses_into_valid_dataclasses():
    from hf_extensions.cli import RecipeArgumentParser
    from hf_extensions.models.image_classification import ImageClassificationArguments
    from recipes.bnn_mutual.train import BayesianPeersArguments
    from trainers.bnn_mutual_config import BayesianMutualLearningConfig

    parser = RecipeArgumentParser(
        (BayesianPeersArguments, ImageClassificationArguments, BayesianMutualLearningConfig)
    )
    peers, data, config = parser.parse(
        ["--config", str(RECIPE / "cifar100_resnet.yaml"), "--use_cpu", "true", "--bf16", "false"]
    )
    assert peers.moped_delta == 0.1 and data.dataset_name == "uoft-cs/cifar100"
    assert config.feature_layers[-1] == "classifier.1:input" and config.mc_samples == 20

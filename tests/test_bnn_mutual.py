"""BayesianMutualLearningTrainer: the objective term by term, accumulation, baselines, effects.

Weight noise is frozen with :func:`hf_extensions.bnn.fixed_noise` wherever two runs must see
the same weights (equivalences); elsewhere the Gaussian layers sample as in real training.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conformance.case import QUIET
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl
from transformers import TrainingArguments

from hf_extensions.bnn import (
    PeerEnsemble,
    convert_to_bayesian,
    fixed_noise,
    fuse_features,
    gaussian_parameters,
    peer_distance,
)
from hf_extensions.data import load_digits
from hf_extensions.hub import check_model_card_method
from hf_extensions.models import tiny_mlp_classifier, tiny_vit_classifier
from trainers.bnn_mutual_config import BayesianMutualLearningConfig
from trainers.bnn_mutual_trainer import BayesianMutualLearningTrainer, linear_cka

DEFAULTS = dict(
    **QUIET,
    optim="sgd",
    learning_rate=0.1,
    lr_scheduler_type="constant",
    weight_decay=0.0,
    max_grad_norm=0.0,
)
FEATURES = {"mlp": ["net.1", "net.3"], "vit": ["vit.layers.0", "classifier:input"]}


def _data(kind: str, rows: int, keep_id: bool = False):
    if kind == "mlp":
        split, columns = load_digits(seed=0, layout="vector")["train"], ["features", "labels"]
    else:
        split, columns = load_digits(seed=0)["train"], ["pixel_values", "labels"]
    return split.select(range(rows)).select_columns(columns + (["sample_id"] if keep_id else []))


def _peers(kind: str, count: int = 2, hidden=(16, 16)):
    if kind == "mlp":
        models = [tiny_mlp_classifier(hidden_sizes=hidden, seed=k) for k in range(count)]
    else:
        models = [tiny_vit_classifier(seed=k) for k in range(count)]
    return [convert_to_bayesian(m).train() for m in models]


def _config(output_dir, kind="mlp", **overrides):
    values = {**DEFAULTS, "feature_layers": FEATURES[kind], **overrides}
    return BayesianMutualLearningConfig(output_dir=str(output_dir), **values)


def _train(kind, output_dir, rows=32, peers=2, noise_seed=0, same_init=False, **overrides):
    if same_init:  # every peer a copy of one model: aligned features, as the benchmark starts
        first = _peers(kind, 1)[0]
        model = PeerEnsemble([first] + [copy.deepcopy(first) for _ in range(peers - 1)])
    else:
        model = PeerEnsemble(_peers(kind, peers))
    trainer = BayesianMutualLearningTrainer(
        model=model, args=_config(output_dir, kind, **overrides), train_dataset=_data(kind, rows)
    )
    if noise_seed is None:
        trainer.train()
    else:
        with fixed_noise(model, seed=noise_seed):
            trainer.train()
    return trainer


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


# -- configuration ---------------------------------------------------------------------------


def test_config_refuses_an_unbounded_feature_kl(tmp_path):
    with pytest.raises(ValueError, match="feature_diversity_bound"):
        _config(tmp_path, feature_divergence="kl", feature_diversity_bound="none")
    assert _config(tmp_path, feature_divergence="kl", feature_diversity_bound="log")
    card = _config(tmp_path).method_hyperparameters()
    assert card["parameter_divergence"] == "wasserstein" and card["mc_samples"] == 20


def test_trainer_refuses_what_it_cannot_train(tmp_path):
    data = _data("mlp", 8)
    with pytest.raises(TypeError, match="PeerEnsemble"):
        BayesianMutualLearningTrainer(
            model=tiny_mlp_classifier(), args=_config(tmp_path), train_dataset=data
        )
    ensemble = PeerEnsemble(_peers("mlp"))
    with pytest.raises(TypeError, match="BayesianMutualLearningConfig"):
        BayesianMutualLearningTrainer(
            model=ensemble, args=TrainingArguments(str(tmp_path), use_cpu=True), train_dataset=data
        )
    deterministic = PeerEnsemble(
        [tiny_mlp_classifier(hidden_sizes=(16, 16), seed=k) for k in range(2)]
    )
    with pytest.raises(ValueError, match="Bayesian peers"):
        BayesianMutualLearningTrainer(
            model=deterministic, args=_config(tmp_path), train_dataset=data
        )
    mismatched = PeerEnsemble(
        [_peers("mlp", 1)[0], _peers("mlp", 1, hidden=(8, 16))[0]], feature_layers=None
    )
    with pytest.raises(ValueError, match="same Gaussian layers"):
        BayesianMutualLearningTrainer(model=mismatched, args=_config(tmp_path), train_dataset=data)
    # deterministic peers are plain DML: no KL, no parameter term
    plain = BayesianMutualLearningTrainer(
        model=deterministic,
        args=_config(tmp_path, parameter_diversity_weight=0.0, max_steps=1),
        train_dataset=data,
    )
    plain.train()


# -- the objective ---------------------------------------------------------------------------


def _hand_objective(peers, features, labels, config, n):
    """L = sum_k L_k written out with torch.distributions, every other peer detached."""
    count = len(peers)
    logits = [peer(features)["logits"] for peer in peers]
    stages = [[peer.net[:2](features), peer.net[:4](features)] for peer in peers]
    fused = [fuse_features(s) for s in stages]
    params = [gaussian_parameters(peer) for peer in peers]
    phi = {
        "clip": lambda x: torch.minimum(x, torch.ones_like(x)),
        "saturating": lambda x: x / (1 + x),
        "log": torch.log1p,
        "none": lambda x: x,
    }
    t, tau = config.mutual_temperature, config.feature_temperature
    total = 0.0
    for k in range(count):
        others = [j for j in range(count) if j != k]
        loss = F.cross_entropy(logits[k], labels)
        kl = sum(torch_kl(Normal(mu, s), Normal(0.0, 1.0)).sum() for _, mu, s in params[k])
        loss = loss + config.kl_weight * kl / n
        mutual = 0.0
        for j in others:
            p_j = F.softmax(logits[j].detach() / t, -1)
            log_p_k = F.log_softmax(logits[k] / t, -1)
            mutual = mutual + (p_j * (p_j.log() - log_p_k)).sum(-1).mean() * t**2
        loss = loss + config.mutual_weight * mutual / len(others)
        par = 0.0
        for j in others:
            terms, count_weights = 0.0, 0
            for (_, mu_k, s_k), (_, mu_j, s_j) in zip(params[k], params[j]):
                mu_j, s_j = mu_j.detach(), s_j.detach()
                if config.parameter_divergence == "wasserstein":
                    d = (mu_k - mu_j) ** 2 + (s_k - s_j) ** 2
                    if config.parameter_diversity_units == "posterior_std":
                        d = d / ((s_k.detach() ** 2 + s_j**2) / 2)
                else:
                    d = torch_kl(Normal(mu_k, s_k), Normal(mu_j, s_j))
                terms = (
                    terms
                    + phi[config.parameter_diversity_bound](
                        d / config.parameter_diversity_scale**2
                    ).sum()
                )
                count_weights += d.numel()
            norm = (
                n if config.parameter_diversity_normalization == "dataset_size" else count_weights
            )
            par = par + terms / norm
        loss = loss - config.parameter_diversity_weight * par / len(others)
        feat = 0.0
        for j in others:
            f_k, f_j = fused[k], fused[j].detach()
            if config.feature_divergence == "cka":
                a, b = f_k - f_k.mean(0), f_j - f_j.mean(0)
                hsic = lambda x, y: ((x @ x.T) * (y @ y.T)).sum()  # noqa: E731
                d = 1 - hsic(a, b) / (hsic(a, a).sqrt() * hsic(b, b).sqrt())
            elif config.feature_divergence == "cosine":
                d = 1 - (f_k * f_j).sum(-1) / (f_k.norm(dim=-1) * f_j.norm(dim=-1))
            else:
                p, q = F.softmax(f_k / tau, -1), F.softmax(f_j / tau, -1)
                if config.feature_divergence == "kl":
                    d = (q * (q.log() - p.log())).sum(-1)
                else:
                    m = (p + q) / 2
                    d = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
            feat = feat + phi[config.feature_diversity_bound](d.mean())
        loss = loss - config.feature_diversity_weight * feat / len(others)
        total = total + loss
    return total


@pytest.mark.parametrize(
    ("parameter", "feature"),
    [
        (("wasserstein", "saturating", "dataset_size", 1.0, "absolute"), ("cosine", "none")),
        (("kl", "log", "num_parameters", 0.5, "absolute"), ("jensen_shannon", "saturating")),
        (("wasserstein", "log", "num_parameters", 0.3, "absolute"), ("kl", "log")),
        (("wasserstein", "clip", "dataset_size", 3.0, "posterior_std"), ("cka", "none")),
    ],
)
def test_objective_and_its_gradient_equal_the_hand_written_loss(tmp_path, parameter, feature):
    """Three peers (each averages over two others), every term on, each form of each term."""
    divergence, bound, normalization, scale, units = parameter
    config = _config(
        tmp_path,
        kl_weight=0.7,
        kl_dataset_size=100,
        mutual_weight=0.8,
        mutual_temperature=2.0,
        parameter_diversity_weight=1.5,
        parameter_divergence=divergence,
        parameter_diversity_bound=bound,
        parameter_diversity_normalization=normalization,
        parameter_diversity_scale=scale,
        parameter_diversity_units=units,
        feature_diversity_weight=0.6,
        feature_divergence=feature[0],
        feature_diversity_bound=feature[1],
        feature_temperature=0.5,
    )
    peers = _peers("mlp", 3)
    with torch.no_grad():  # the peers' sigmas differ, so that every sigma term matters
        for k, peer in enumerate(peers):
            for name, param in peer.named_parameters():
                if name.endswith("rho"):
                    param.add_(0.3 * k + 0.1 * torch.randn_like(param))
    ensemble = PeerEnsemble(peers)
    trainer = BayesianMutualLearningTrainer(model=ensemble, args=config)
    columns = _data("mlp", 12).with_format("torch")[:]
    features, labels = columns["features"].float(), columns["labels"].long()
    parameters = list(ensemble.parameters())
    with fixed_noise(ensemble, seed=3):
        loss = trainer.compute_loss(ensemble.train(), {"features": features, "labels": labels})
        grads = torch.autograd.grad(loss, parameters)
        expected = _hand_objective(list(ensemble.peers), features, labels, config, 100)
        expected_grads = torch.autograd.grad(expected, parameters)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    for grad, reference in zip(grads, expected_grads):
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-6)
    # the diversity terms pull the other way from the rest: they are really in the loss
    no_diversity = _hand_objective(
        list(ensemble.peers),
        features,
        labels,
        _config(
            tmp_path,
            kl_weight=0.7,
            mutual_weight=0.8,
            mutual_temperature=2.0,
            parameter_diversity_weight=0.0,
            feature_diversity_weight=0.0,
        ),
        100,
    )
    assert expected.item() < no_diversity.item() - 1e-3


@pytest.mark.parametrize("kind", ["mlp", "vit"])
def test_gradient_accumulation_equals_one_batch(tmp_path, kind):
    """2 micro-batches of 8 == one batch of 16, every term on: KL / N and the parameter term
    count once per optimizer step, not once per micro-batch. (The per-example cosine feature
    term: the default CKA is a statistic of the whole micro-batch, so accumulation averages
    micro-batch CKAs, a documented estimator of its own.)"""
    common = dict(
        max_steps=3,
        parameter_diversity_weight=1.0,
        feature_diversity_weight=0.5,
        feature_divergence="cosine",
    )
    accumulated = _train(
        kind,
        tmp_path / "ga",
        48,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        **common,
    )
    one_batch = _train(kind, tmp_path / "one", 48, per_device_train_batch_size=16, **common)
    after, reference = _params(accumulated.model), _params(one_batch.model)
    assert _max_diff(after, reference) < 1e-6
    initial = _params(PeerEnsemble(_peers(kind)))
    assert _max_diff(after, initial) > 1e-3
    assert accumulated.state.log_history[-1]["train_loss"] == pytest.approx(
        one_batch.state.log_history[-1]["train_loss"], rel=1e-5
    )


# -- baselines are settings ------------------------------------------------------------------


def test_independent_bnns_train_exactly_as_alone_and_dml_couples_them(tmp_path):
    off = dict(parameter_diversity_weight=0.0, feature_diversity_weight=0.0, max_steps=4)
    alone = _train("mlp", tmp_path / "alone", peers=1, mutual_weight=0.0, **off)
    independent = _train("mlp", tmp_path / "independent", mutual_weight=0.0, **off)
    dml = _train("mlp", tmp_path / "dml", **off)
    reference = _params(alone.model.peers[0])
    assert _max_diff(_params(independent.model.peers[0]), reference) < 1e-7
    assert _max_diff(_params(dml.model.peers[0]), reference) > 1e-5


def test_diversity_terms_push_the_peers_apart(tmp_path):
    """Against DML from the same start (peers copies of one model), noise and data: a larger
    parameter distance with the parameter term, less similar fused features (1 - CKA, the default
    feature divergence) with the feature term."""
    common = dict(max_steps=30, optim="adamw_torch", learning_rate=1e-2, logging_steps=10)
    common["same_init"] = True
    common["per_device_train_batch_size"] = 16
    common["logging_strategy"] = "steps"
    dml = _train(
        "mlp",
        tmp_path / "dml",
        96,
        noise_seed=None,
        parameter_diversity_weight=0.0,
        feature_diversity_weight=0.0,
        **common,
    )
    par = _train(
        "mlp",
        tmp_path / "par",
        96,
        noise_seed=None,
        parameter_diversity_weight=1.0,
        feature_diversity_weight=0.0,
        **common,
    )
    feat = _train(
        "mlp",
        tmp_path / "feat",
        96,
        noise_seed=None,
        parameter_diversity_weight=0.0,
        feature_diversity_weight=1.0,
        **common,
    )
    distance = {
        name: peer_distance(*t.model.peers)
        for name, t in [("dml", dml), ("par", par), ("feat", feat)]
    }
    assert distance["par"] > 1.5 * distance["dml"], distance

    features = _data("mlp", 96).with_format("torch")[:]["features"].float()

    def feature_distance(trainer):
        ensemble = trainer.model.train()
        ensemble.set_feature_layers(FEATURES["mlp"])
        with torch.no_grad(), fixed_noise(ensemble):
            fused = ensemble(features=features).peer_features
        return float(1 - linear_cka(fused[0], fused[1]))

    assert feature_distance(feat) > feature_distance(dml) + 0.05, (
        feature_distance(feat),
        feature_distance(dml),
    )
    logged = par.state.log_history[0]
    assert {"ce", "kl", "mutual", "parameter_diversity"} <= set(logged)
    assert "feature_diversity" in feat.state.log_history[0]


# -- evaluation, saving, columns -------------------------------------------------------------


def test_evaluation_scores_the_model_average_and_saving_round_trips(tmp_path):
    from hf_extensions.metrics import compute_classification_metrics

    model = PeerEnsemble(_peers("mlp"))
    trainer = BayesianMutualLearningTrainer(
        model=model,
        args=_config(tmp_path, max_steps=2, mc_samples=3, per_device_eval_batch_size=64),
        train_dataset=_data("mlp", 32, keep_id=True),
        compute_metrics=compute_classification_metrics,
    )
    assert set(next(iter(trainer.get_train_dataloader()))) == {"features", "labels"}
    trainer.train()
    assert model.mc_samples == 3
    metrics = trainer.evaluate(_data("mlp", 64, keep_id=True))
    # the model's loss (NLL of its averaged prediction) == the NLL of the logits it returns
    assert metrics["eval_loss"] == pytest.approx(metrics["eval_nll"], rel=1e-4)
    assert 0.0 <= metrics["eval_ece"] <= 1.0
    trainer.save_model(str(tmp_path / "saved"))
    trainer.create_model_card()
    check_model_card_method(tmp_path, "bnn-mutual-learning")
    loaded = PeerEnsemble.from_pretrained(
        tmp_path / "saved", peer_factory=lambda k: tiny_mlp_classifier(hidden_sizes=(16, 16))
    )
    reference = model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in loaded.state_dict().items())
    assert loaded.mc_samples == 3


def test_vit_peers_train_evaluate_and_reload_from_their_configs(tmp_path):
    trainer = _train(
        "vit",
        tmp_path,
        rows=16,
        noise_seed=None,
        max_steps=2,
        per_device_train_batch_size=8,
        mc_samples=2,
    )
    trainer.save_model()
    loaded = PeerEnsemble.from_pretrained(tmp_path)
    assert type(loaded.peers[0]).__name__ == "ViTForImageClassification"
    reference = trainer.model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in loaded.state_dict().items())
    pixels = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        log_probs = loaded(pixel_values=pixels).logits
    assert log_probs.shape == (3, 10)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(3), atol=1e-5)
    assert not math.isnan(float(log_probs.sum()))

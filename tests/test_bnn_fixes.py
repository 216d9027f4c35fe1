"""The fixes of issue 23's BNN audit, each with a test that fails on the code before the fix.

1. Parameter diversity ran away on weights the data do not constrain: with ``u = 1`` units and a
   saturating bound the term kept a small gradient on every weight, which Adam turns into a step of
   about the learning rate, so peers' means drifted apart with no effect on any prediction. The
   defaults now measure the distance in posterior standard deviations and clip it at 1.
2. The feature term compared feature coordinates (cosine), which are not aligned between peers
   trained from different seeds; the default is now ``1 - linear CKA`` over the batch.
"""

import copy

import torch
import torch.nn.functional as F
from conformance.case import QUIET

from hf_extensions.bnn import PeerEnsemble, convert_to_bayesian
from hf_extensions.data import load_digits
from hf_extensions.models import tiny_mlp_classifier
from trainers.bnn_mutual_config import BayesianMutualLearningConfig
from trainers.bnn_mutual_trainer import BayesianMutualLearningTrainer, linear_cka

DEFAULTS = dict(
    **QUIET,
    optim="adamw_torch",
    learning_rate=3e-3,
    weight_decay=0.0,
    lr_scheduler_type="constant",
    max_grad_norm=0.0,
    per_device_train_batch_size=32,
)
DEAD = slice(0, 32)  # input features set to 0: their first-layer weights get no data gradient


def _dead_input_data(rows: int = 128):
    split = load_digits(seed=0, layout="vector")["train"].select(range(rows))

    def kill(batch):
        features = torch.tensor(batch["features"])
        features[:, DEAD] = 0.0
        return {"features": features.tolist()}

    return split.select_columns(["features", "labels"]).map(kill, batched=True)


def _drift_after_training(tmp_path, **overrides) -> tuple[float, float]:
    """Two peers from one model (the second's means nudged by 1e-3, as any asymmetry would),
    parameter diversity only; returns (max |mu - mu_0|, max sigma) over the first-layer weights
    whose input is always 0."""
    base = convert_to_bayesian(tiny_mlp_classifier(hidden_sizes=(16,), seed=0)).train()
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.net[0].weight.add_(1e-3 * torch.randn(other.net[0].weight.shape))
    ensemble = PeerEnsemble([base, other])
    start = base.net[0].weight[:, DEAD].detach().clone()
    args = BayesianMutualLearningConfig(
        output_dir=str(tmp_path),
        **DEFAULTS,
        num_train_epochs=60,  # 240 Adam steps
        kl_weight=0.0,  # nothing but the diversity term touches the dead weights
        parameter_diversity_weight=1.0,
        feature_diversity_weight=0.0,
        **overrides,
    )
    BayesianMutualLearningTrainer(
        model=ensemble, args=args, train_dataset=_dead_input_data()
    ).train()
    with torch.no_grad():
        drift = max(float((p.net[0].weight[:, DEAD] - start).abs().max()) for p in ensemble.peers)
        sigma = max(float(F.softplus(p.net[0].weight_rho[:, DEAD]).max()) for p in ensemble.peers)
    return drift, sigma


def test_parameter_diversity_does_not_move_weights_the_data_do_not_constrain(tmp_path):
    """Default: the dead weights stay within about one posterior std of where they started."""
    drift, sigma = _drift_after_training(tmp_path / "default")
    assert drift < 2 * sigma, (drift, sigma)
    # the behaviour before the fix (absolute units, saturating bound): they run away
    drift, sigma = _drift_after_training(
        tmp_path / "before",
        parameter_diversity_units="absolute",
        parameter_diversity_bound="saturating",
    )
    assert drift > 5 * sigma, (drift, sigma)


def test_clip_bound_has_no_gradient_once_saturated():
    from trainers.bnn_mutual_trainer import bound

    x = torch.tensor([0.5, 2.0], requires_grad=True)
    bound(x, "clip").sum().backward()
    assert x.grad.tolist() == [1.0, 0.0]


def test_default_feature_term_ignores_how_each_peer_arranges_its_channels(tmp_path):
    """Same representation, channels rotated (peers from different seeds): no diversity by
    default; the coordinate-wise cosine called it diverse."""
    args = BayesianMutualLearningConfig(output_dir=str(tmp_path), **DEFAULTS)
    base = convert_to_bayesian(tiny_mlp_classifier(seed=0))
    trainer = BayesianMutualLearningTrainer(
        model=PeerEnsemble([base, copy.deepcopy(base)]), args=args
    )
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(32, 48, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(48, 48, generator=generator))
    rotated = 2.5 * features @ rotation
    unrelated = torch.randn(32, 48, generator=generator)
    assert float(trainer.feature_diversity(features, rotated)) < 1e-5
    assert float(trainer.feature_diversity(features, unrelated)) > 0.3
    cosine = 1 - F.cosine_similarity(features, rotated, dim=-1).mean()
    assert float(cosine) > 0.5  # what the old default measured


def test_linear_cka_bounds_and_gradient():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(16, 8, generator=generator, requires_grad=True)
    b = torch.randn(16, 5, generator=generator)
    value = linear_cka(a, b)
    assert 0.0 <= float(value.detach()) <= 1.0
    assert abs(float(linear_cka(a, a)) - 1.0) < 1e-6
    value.backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0

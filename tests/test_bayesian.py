"""Mean-field Gaussian layers, model conversion, the peer ensemble and the reliability diagram."""

import json
import subprocess
import sys
from copy import deepcopy

import pytest
import torch
from torch import nn
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl
from transformers.modeling_outputs import ImageClassifierOutput

from hf_extensions.bnn import (
    BayesianConv2d,
    BayesianLinear,
    PeerEnsemble,
    bayesian_layers,
    convert_to_bayesian,
    fixed_noise,
    flat_posterior,
    fuse_features,
    gaussian_divergence,
    gaussian_parameters,
    kl_divergence,
    peer_distance,
    posterior_mean,
    rho_from_sigma,
)
from hf_extensions.metrics import calibration_bins
from hf_extensions.models import tiny_mlp_classifier, tiny_vit_classifier


def _randomise(layer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mu, _ in layer.gaussian_parameters():
            mu.copy_(torch.randn(mu.shape, generator=generator))
        for rho in (layer.weight_rho, layer.bias_rho):
            if rho is not None:
                rho.copy_(torch.randn(rho.shape, generator=generator) - 2)
    return layer


def _reference_kl(layer, prior_std, prior_means=None):
    total = 0.0
    for name, mu, sigma in layer.gaussian_parameters():
        mean = 0.0 if prior_means is None else prior_means[name]
        total = total + torch_kl(Normal(mu, sigma), Normal(mean, prior_std)).sum()
    return total


@pytest.mark.parametrize("prior_mean", ["zero", "pretrained"])
@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: BayesianLinear(5, 3, **kw),
        lambda **kw: BayesianConv2d(2, 3, kernel_size=3, padding=1, **kw),
    ],
)
def test_layer_kl_equals_the_closed_form(make, prior_mean):
    layer = _randomise(make(prior_std=0.7, prior_mean=prior_mean))
    means = None
    if prior_mean == "pretrained":  # the prior mean is the weights the layer was built with
        means = {"weight": layer.prior_weight_mean, "bias": layer.prior_bias_mean}
        assert not torch.equal(means["weight"], layer.weight)  # randomised after
    expected = _reference_kl(layer, 0.7, means)
    torch.testing.assert_close(layer.kl(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl_divergence(layer), expected, rtol=1e-5, atol=1e-4)


def test_model_kl_sums_layers_with_different_priors():
    model = nn.Sequential(
        _randomise(BayesianLinear(4, 6, prior_std=0.5), seed=1),
        nn.ReLU(),
        _randomise(BayesianLinear(6, 2, prior_std=2.0, prior_mean="pretrained"), seed=2),
    )
    expected = _reference_kl(model[0], 0.5) + _reference_kl(
        model[2], 2.0, {"weight": model[2].prior_weight_mean, "bias": model[2].prior_bias_mean}
    )
    torch.testing.assert_close(kl_divergence(model), expected, rtol=1e-5, atol=1e-4)
    flat = flat_posterior(model)
    assert flat.mu.numel() == sum(p.numel() for n, p in model.named_parameters() if "rho" not in n)
    assert float(kl_divergence(nn.Linear(2, 2))) == 0.0


def test_sigma_to_zero_gives_the_deterministic_hf_model():
    torch.manual_seed(0)
    pixels, labels = torch.rand(6, 1, 8, 8), torch.arange(6)
    reference = tiny_vit_classifier().eval()
    expected = reference(pixel_values=pixels, labels=labels)
    model = convert_to_bayesian(tiny_vit_classifier(), posterior_rho_init=-40.0).eval()
    kinds = {type(m).__name__ for _, m in bayesian_layers(model)}
    assert kinds == {"BayesianLinear", "BayesianConv2d"}
    out = model(pixel_values=pixels, labels=labels)
    assert isinstance(out, ImageClassifierOutput)  # the HF output, not (output, kl)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=1e-6)
    with posterior_mean(model):  # sampling off: exactly the deterministic network
        assert torch.equal(model(pixel_values=pixels).logits, expected.logits)
    # ...while the default sigma = softplus(-3) visibly perturbs it
    noisy = convert_to_bayesian(tiny_vit_classifier()).eval()(pixel_values=pixels).logits
    assert (noisy - expected.logits).abs().max() > 1e-2


def test_means_come_from_the_deterministic_weights_and_moped_sets_sigma():
    reference = tiny_mlp_classifier(seed=3)
    model = convert_to_bayesian(tiny_mlp_classifier(seed=3), moped_delta=0.1)
    for (name, mu, sigma), (ref_name, ref) in zip(
        gaussian_parameters(model), reference.named_parameters()
    ):
        assert name == ref_name and torch.equal(mu, ref)
        torch.testing.assert_close(sigma, (0.1 * ref.abs()).clamp_min(1e-8), rtol=1e-4, atol=1e-7)
    fresh = convert_to_bayesian(tiny_mlp_classifier(seed=3), init_from_pretrained=False)
    assert not torch.equal(fresh.net[0].weight, reference.net[0].weight)
    torch.testing.assert_close(
        torch.nn.functional.softplus(rho_from_sigma(torch.tensor([1e-3, 0.5, 20.0]))),
        torch.tensor([1e-3, 0.5, 20.0], dtype=torch.float64),
    )


def test_forward_samples_and_gradients_reach_mu_and_rho():
    model = convert_to_bayesian(tiny_mlp_classifier())
    x, y = torch.rand(8, 64), torch.arange(8)
    assert not torch.equal(model(x)["logits"], model(x)["logits"])
    loss = model(x, y)["loss"] + kl_divergence(model) / 100
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def _output_moments(layer, x, draws):
    with torch.no_grad():
        outputs = torch.cat([layer(x) for _ in range(draws)])
    return outputs.mean(0), outputs.var(0)


@pytest.mark.parametrize("estimator", ["reparameterization", "flipout"])
def test_linear_estimators_have_the_exact_predictive_moments(estimator):
    """Both estimators draw y = W x + b with W ~ q: mean mu x + b, variance sum x^2 sigma^2 + s_b^2
    (4000 draws; Flipout's output is Gaussian too, its signs only permute the noise)."""
    torch.manual_seed(0)
    layer = _randomise(BayesianLinear(6, 3, estimator=estimator), seed=4)
    x = torch.randn(1, 6)
    mean, var = _output_moments(layer, x, 4000)
    sigma_w, sigma_b = [s for _, _, s in layer.gaussian_parameters()]
    with torch.no_grad():
        expected_mean = layer.weight @ x[0] + layer.bias
        expected_var = (x[0] ** 2 * sigma_w**2).sum(1) + sigma_b**2
    tolerance = 5 * (expected_var.max() / 4000).sqrt().item()  # 5 standard errors
    torch.testing.assert_close(mean, expected_mean, rtol=0, atol=tolerance)
    torch.testing.assert_close(var, expected_var, rtol=0.12, atol=0)  # SE 2.2%


def test_flipout_decorrelates_the_examples_of_a_batch():
    """Reparameterisation shares one weight draw across a batch; Flipout gives every example its
    own pseudo-independent perturbation (Wen et al. 2018), with the same distribution."""
    torch.manual_seed(0)
    base = _randomise(BayesianConv2d(2, 3, kernel_size=2), seed=5)
    flip = BayesianConv2d(2, 3, kernel_size=2, estimator="flipout")
    flip.load_state_dict(base.state_dict())
    x = torch.randn(1, 2, 3, 3)
    with torch.no_grad():
        same = base(x.expand(2, -1, -1, -1))
        apart = flip(x.expand(2, -1, -1, -1))
    assert torch.equal(same[0], same[1]) and not torch.equal(apart[0], apart[1])
    mean_r, var_r = _output_moments(base, x, 3000)
    mean_f, var_f = _output_moments(flip, x, 3000)
    scale = var_r.sqrt().max().item()
    torch.testing.assert_close(mean_f, mean_r, rtol=0, atol=0.15 * scale)  # ~5 SE
    torch.testing.assert_close(var_f, var_r, rtol=0.18, atol=0)  # SE of the ratio ~3.7%
    with posterior_mean(flip):
        assert torch.equal(flip(x), base._conv_forward(x, base.weight, base.bias))


def test_conversion_skips_tied_weights_and_attention_internals_and_is_idempotent():
    shared = nn.Linear(4, 4)
    tied = nn.Linear(4, 4)
    tied.weight = shared.weight
    model = nn.ModuleDict(
        {
            "shared": shared,
            "tied": tied,
            "attn": nn.MultiheadAttention(4, 2),
            "free": nn.Linear(4, 2),
        }
    )
    convert_to_bayesian(model)
    assert [name for name, _ in bayesian_layers(model)] == ["free"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convert_to_bayesian(model)  # converting again changes nothing
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    vit = convert_to_bayesian(tiny_vit_classifier(), exclude_modules=["classifier"])
    assert isinstance(vit.classifier, nn.Linear) and not isinstance(vit.classifier, BayesianLinear)
    only = convert_to_bayesian(tiny_vit_classifier(), target_modules=["q_proj"])
    assert len(bayesian_layers(only)) == 2
    with pytest.raises(ValueError, match="target_modules"):
        convert_to_bayesian(tiny_vit_classifier(), target_modules=["nothing"])
    with pytest.raises(ValueError, match="estimator"):
        convert_to_bayesian(tiny_vit_classifier(), estimator="local")


def test_fixed_noise_freezes_the_draw_and_is_seeded():
    model = convert_to_bayesian(tiny_mlp_classifier())
    x = torch.rand(4, 64)
    with fixed_noise(model, seed=1):
        a, b = model(x)["logits"], model(x)["logits"]
    with fixed_noise(model, seed=1):
        c = model(x)["logits"]
    with fixed_noise(model, seed=2):
        d = model(x)["logits"]
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(a, d)
    assert not torch.equal(model(x)["logits"], model(x)["logits"])  # released afterwards


def test_gaussian_divergences_and_peer_distance():
    mu_a, mu_b = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])
    s_a, s_b = torch.tensor([1.0, 0.5]), torch.tensor([2.0, 0.5])
    w = gaussian_divergence(mu_a, s_a, mu_b, s_b, "wasserstein")
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0]))
    kl = gaussian_divergence(mu_a, s_a, mu_b, s_b, "kl")
    torch.testing.assert_close(kl, torch_kl(Normal(mu_a, s_a), Normal(mu_b, s_b)))
    a = convert_to_bayesian(tiny_mlp_classifier(seed=0))
    assert peer_distance(a, a) == 0.0
    b = convert_to_bayesian(tiny_mlp_classifier(seed=1))
    count = sum(p.numel() for n, p in a.named_parameters() if "rho" not in n)
    manual = sum(
        ((pa - pb) ** 2).sum().detach()
        for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters())
        if "rho" not in n
    )
    assert peer_distance(a, b) == pytest.approx(manual.item() / count, rel=1e-5)


def test_fused_features_standardise_each_stage():
    torch.manual_seed(0)
    stages = [torch.randn(3, 5, 4, 4), torch.randn(3, 7, 6)]  # conv map, token sequence
    fused = fuse_features(stages)
    assert fused.shape == (3, 5 + 6)
    rescaled = fuse_features([100 * stages[0] + 3, stages[1]])  # a stage's scale does not count
    torch.testing.assert_close(rescaled, fused, rtol=1e-3, atol=1e-3)


def _vit_peers(count=2):
    return [convert_to_bayesian(tiny_vit_classifier(seed=k)) for k in range(count)]


def test_ensemble_prediction_is_the_average_over_peers_and_draws():
    ensemble = PeerEnsemble(_vit_peers(), mc_samples=3).eval()
    pixels, labels = torch.rand(5, 1, 8, 8), torch.arange(5)
    torch.manual_seed(7)
    out = ensemble(pixel_values=pixels, labels=labels)
    torch.manual_seed(7)  # the same draws, in the same order: peer 0 three times, then peer 1
    probs = torch.stack(
        [peer(pixel_values=pixels).logits.softmax(-1) for peer in ensemble.peers for _ in range(3)]
    ).mean(0)
    torch.testing.assert_close(out.logits.softmax(-1), probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, torch.nn.functional.nll_loss(probs.log(), labels))
    assert set(out.keys()) == {"loss", "logits"}  # nothing else for Trainer's prediction_step
    ensemble.train()
    train_out = ensemble(pixel_values=pixels, labels=labels)
    assert train_out.peer_logits.shape == (2, 5, 10) and train_out.peer_features is None
    ensemble.set_feature_layers("auto")
    assert ensemble.feature_layers == ["vit.layers.0", "vit.layers.1", "classifier:input"]
    assert ensemble(pixel_values=pixels).peer_features.shape == (2, 5, 3 * 32)
    copy = deepcopy(ensemble)  # the copy's hooks capture into the copy
    assert copy(pixel_values=pixels).peer_features.shape == (2, 5, 3 * 32)
    assert {"pixel_values", "labels"} <= set(ensemble.input_names())
    assert "kwargs" not in ensemble.input_names()


def test_ensemble_save_and_load_round_trip(tmp_path):
    ensemble = PeerEnsemble(_vit_peers(), mc_samples=4, feature_layers=["vit.layers.1"])
    with torch.no_grad():  # move every tensor away from its initial value
        for param in ensemble.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    ensemble.save_pretrained(tmp_path / "vit")
    loaded = PeerEnsemble.from_pretrained(tmp_path / "vit")  # rebuilt from the saved HF configs
    assert loaded.mc_samples == 4 and loaded.feature_layers == ["vit.layers.1"]
    reference = ensemble.state_dict()
    assert reference.keys() == loaded.state_dict().keys()
    assert all(torch.equal(reference[k], v) for k, v in loaded.state_dict().items())
    pixels = torch.rand(3, 1, 8, 8)
    with posterior_mean(ensemble), posterior_mean(loaded):
        assert torch.equal(
            ensemble.eval()(pixel_values=pixels).logits, loaded(pixel_values=pixels).logits
        )

    mlp = PeerEnsemble([convert_to_bayesian(tiny_mlp_classifier(seed=k)) for k in range(2)])
    mlp.save_pretrained(tmp_path / "mlp")
    with pytest.raises(ValueError, match="peer_factory"):
        PeerEnsemble.from_pretrained(tmp_path / "mlp")
    again = PeerEnsemble.from_pretrained(
        tmp_path / "mlp", peer_factory=lambda k: tiny_mlp_classifier()
    )
    assert all(torch.equal(mlp.state_dict()[k], v) for k, v in again.state_dict().items())

    config_path = tmp_path / "mlp" / "peer_ensemble.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="format version"):
        PeerEnsemble.from_pretrained(tmp_path / "mlp", peer_factory=lambda k: tiny_mlp_classifier())
    config_path.write_text(
        json.dumps(
            {
                **config,
                "peers": [{**peer, "class": "os.system", "config": {}} for peer in config["peers"]],
            }
        )
    )
    with pytest.raises(ValueError, match="not a transformers model class"):
        PeerEnsemble.from_pretrained(tmp_path / "mlp")


def test_reliability_diagram_draws_the_calibration_bins():
    from matplotlib.figure import Figure

    from hf_extensions.metrics.reliability import reliability_diagram

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 4, generator=generator) * 2
    labels = torch.randint(0, 4, (300,), generator=generator)
    ax = Figure().subplots()
    assert reliability_diagram(logits, labels, from_logits=True, ax=ax, label="m") is ax
    bins = calibration_bins(logits, labels, from_logits=True)
    filled = bins.counts > 0
    heights = [patch.get_height() for patch in ax.containers[0]]
    assert heights == pytest.approx(list(bins.accuracy[filled]))
    gaps = [patch.get_height() for patch in ax.containers[1]]
    assert gaps == pytest.approx(list((bins.confidence - bins.accuracy)[filled]))
    assert "ECE" in ax.get_legend().get_texts()[0].get_text()


def test_reliability_module_imports_matplotlib_lazily():
    code = "import sys, hf_extensions.metrics.reliability; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"

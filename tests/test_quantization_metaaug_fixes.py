"""Issue 24: MetaAug's meta-gradient reaches T, the official mixup, the first-layer default,
QDrop masks on the device, the cached float logits, and the Genie-M base."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from hf_extensions.quantization import MetaAugConfig, quantize_model_rtn, reconstruct_model
from hf_extensions.quantization.metaaug import mixup_lambda, train_transform
from hf_extensions.quantization.quantizers import WeightQuantizer, fake_quantize
from hf_extensions.quantization.reconstruction import (
    capture_block,
    find_blocks,
    reconstruct_block,
    set_quant_enabled,
)


def _cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    ).eval()


def _meta_setting(model: nn.Module, images: torch.Tensor, config: MetaAugConfig):
    """RTN-initialised copy of ``model`` with blocks 0 and 1 switched on; returns it, the float
    copy and the name of block 1 (the first block MetaAug runs on)."""
    for p in model.parameters():
        p.requires_grad_(False)
    fp = copy.deepcopy(model)
    quantize_model_rtn(model, config, images)
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = find_blocks(model, images[:2])
    set_quant_enabled(model, False)
    for name in blocks[:2]:
        set_quant_enabled(model.get_submodule(name), True)
    return model, fp, blocks[1]


def test_kl_term_owns_at_least_one_percent_of_t_gradient_at_the_benchmark_setting():
    # The benchmark's setting: the zoo's ResNet-20 at W2A2, 32 calibration images, the paper's
    # weights a=5, b=0.5, c=30000. With meta_balance="none" the KL share is about 2e-4 here.
    from transformers import ResNetForImageClassification

    from hf_extensions.data.hard_digits import STYLES, render_hard_digits
    from hf_extensions.zoo import fixture_path

    model = ResNetForImageClassification.from_pretrained(fixture_path("resnet20")).eval()
    images = render_hard_digits(
        32, split="train", styles=tuple(STYLES), colours=("red", "green", "blue", "yellow"), seed=0
    ).images
    config = MetaAugConfig(
        weight_bits=2,
        activation_bits=2,
        meta_iterations=1,
        margin=0.1 * images.var().item(),
    )
    model, fp, name = _meta_setting(model, images, config)
    _, log = train_transform(model, fp, name, images, config, torch.Generator().manual_seed(0))
    shares = log["history"]["share_kl"]
    assert min(shares) >= 0.01, shares
    assert all(n > 0 for n in log["history"]["grad_norm_kl"])  # a real gradient, rescaled


def test_default_keeps_the_first_layer_input_in_float():
    # The spec and the config's own docstring: first layer W8 on the float image.
    config = MetaAugConfig(weight_bits=4, activation_bits=4)
    assert config.quantize_first_layer_input is False
    model = quantize_model_rtn(_cnn(), config, torch.rand(4, 1, 6, 6))
    assert model[0].activation_bits is None and model[0].weight_bits == 8
    assert model[2].activation_bits == 4 and model[7].activation_bits == 8


def test_mixup_lambda_follows_the_official_beta_4_4_folded_above_one_half():
    generator = torch.Generator().manual_seed(0)
    ours = np.sort([mixup_lambda(generator) for _ in range(20000)])
    rng = np.random.default_rng(0)
    official = rng.beta(4, 4, 20000)
    official = np.sort(np.maximum(official, 1 - official))
    assert ours.min() >= 0.5
    # Two-sample Kolmogorov-Smirnov distance (uniform lambda folded: about 0.2).
    grid = np.linspace(0.5, 1.0, 501)
    ks = np.abs(np.searchsorted(ours, grid) - np.searchsorted(official, grid)).max() / 20000
    assert ks < 0.02
    assert abs(ours.mean() - official.mean()) < 0.005


def _block_data(drop_prob: float):
    model = _cnn()
    config = MetaAugConfig(method="qdrop", iterations=3, weight_bits=4, activation_bits=4)
    images = torch.rand(16, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    fp = copy.deepcopy(model)
    quantize_model_rtn(model, config, images)
    for p in model.parameters():
        p.requires_grad_(False)
    q = capture_block(model, "2", images, need_output=False)
    f = capture_block(fp, "2", images)
    return model.get_submodule("2"), q, f, config


@pytest.mark.parametrize("drop_prob", [0.0, 0.5])
def test_qdrop_masks_are_drawn_on_the_input_device_and_not_at_zero_probability(
    monkeypatch, drop_prob
):
    block, q, f, config = _block_data(drop_prob)
    draws = []
    rand = torch.rand

    def counting_rand(*args, **kwargs):
        draws.append(kwargs.get("device"))
        return rand(*args, **kwargs)

    monkeypatch.setattr(torch, "rand", counting_rand)
    reconstruct_block(block, q, f, config, drop_prob, torch.Generator().manual_seed(0))
    if drop_prob == 0:
        assert draws == []  # no mask drawn (nor copied) when nothing is dropped
    else:
        assert len(draws) == config.iterations
        assert all(d == q.inputs.device for d in draws)


def test_float_logits_are_computed_once_per_run_not_per_meta_step():
    images = torch.rand(12, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    config = MetaAugConfig(weight_bits=4, activation_bits=4, meta_iterations=3, batch_size=6)
    results, head_calls = [], []
    for cached in (False, True):
        model, fp, name = _meta_setting(_cnn(), images, config)
        fp[7].register_forward_hook(lambda *_: head_calls.append(1))
        logits = fp(images) if cached else None
        head_calls.clear()
        transform, _ = train_transform(
            model, fp, name, images, config, torch.Generator().manual_seed(0), logits
        )
        results.append([p.clone() for p in transform.parameters()])
        # Uncached: once at the start (not once per meta step); cached: never.
        assert len(head_calls) == (0 if cached else 1)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_genie_learns_weight_scales_with_the_rounding_and_stores_weights_on_them():
    images = torch.rand(32, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    common = {"weight_bits": 2, "activation_bits": 4, "iterations": 20, "rounding_weight": 1.0}
    runs = {}
    for method, lr in (("qdrop", 0.0), ("genie", 0.0), ("genie", 1e-3)):
        model = _cnn()
        config = MetaAugConfig(method=method, weight_scale_lr=lr, **common)
        reconstruct_model(model, images, config, progress=False)
        runs[(method, lr)] = model
    rtn = quantize_model_rtn(_cnn(), MetaAugConfig(**common), images[:32])
    # At lr 0 Genie-M is QDrop exactly; with lr > 0 the inner layer's scales moved.
    torch.testing.assert_close(
        runs[("genie", 0.0)][2].weight, runs[("qdrop", 0.0)][2].weight, rtol=0, atol=0
    )
    learned = runs[("genie", 1e-3)][2]
    assert not torch.allclose(learned.weight_scale, rtn[2].weight_scale)
    # The stored weight lies on the stored (learned) grid: re-quantizing it is the identity.
    requant = fake_quantize(
        learned.weight, learned.weight_scale, learned.weight_zero_point, 0, 3, 0
    )
    torch.testing.assert_close(requant, learned.weight, rtol=0, atol=1e-6)


def test_learned_scale_at_its_initial_value_equals_fixed_scale_adaround():
    weight = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    fixed = WeightQuantizer(bits=3).calibrate(weight).init_adaround(weight)
    learned = copy.deepcopy(fixed)
    learned.learn_scale()
    assert isinstance(learned.scale, nn.Parameter)
    torch.testing.assert_close(learned(weight), fixed(weight), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(learned(weight).pow(2).sum(), [learned.scale])
    assert grad.abs().min() > 0

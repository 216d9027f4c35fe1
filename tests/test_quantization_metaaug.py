"""MetaAug's bi-level stage: the inner step's gradient reaches T and matches finite differences."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_extensions.quantization import (
    MetaAugConfig,
    TransformNet,
    meta_losses,
    pkt_loss,
    quantize_model_rtn,
)
from hf_extensions.quantization.reconstruction import attach_learners


def _toy(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 4),
    ).double()
    with torch.no_grad():
        model[5].weight.mul_(30)  # confident logits: a KL far above float64 round-off
    return model


def _setup(inner_lr: float, **weights: float):
    """Weight-only W3 toy (smooth in T: soft AdaRound, no activation rounding), block "2"."""
    config = MetaAugConfig(
        method="metaaug",
        weight_bits=3,
        activation_bits=None,
        inner_lr=inner_lr,
        drop_prob=0.0,
        **weights,
    )
    model = _toy()
    fp_model = copy.deepcopy(model)
    quantize_model_rtn(model, config)
    for p in list(model.parameters()) + list(fp_model.parameters()):
        p.requires_grad_(False)
    (alpha,), _ = attach_learners(model.get_submodule("2"), 0.0)
    with torch.no_grad():
        # Soft AdaRound starts at the float weights, where the KL to the float model is at its
        # minimum (about 1e-9 here) and flat; move V as a partly optimised rounding would.
        alpha.add_(2 * torch.randn(alpha.shape, generator=torch.Generator().manual_seed(3)))
    torch.manual_seed(1)
    transform = TransformNet(1, hidden=4, num_blocks=1).double()
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(6, 1, 4, 4, generator=generator, dtype=torch.float64)
    x_val = torch.rand(6, 1, 4, 4, generator=generator, dtype=torch.float64)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])

    def objective() -> torch.Tensor:
        return meta_losses(
            model, fp_model, "2", transform, x, x_val, config, None, 0.3, perm, "5"
        ).total

    return transform, objective


def _finite_difference(param: torch.Tensor, index: tuple, objective, eps: float = 1e-4) -> float:
    original = param[index].item()
    values = []
    for value in (original + eps, original - eps):
        with torch.no_grad():
            param[index] = value
        values.append(objective().item())  # the inner step needs autograd
    with torch.no_grad():
        param[index] = original
    return (values[0] - values[1]) / (2 * eps)


def test_kl_gradient_reaches_transform_through_the_inner_step_and_matches_finite_differences():
    # Only the KL term on the ORIGINAL images: T can influence it only through θ̄ = θ - η ∇θ L(T(x)).
    transform, objective = _setup(
        inner_lr=5.0, kl_weight=1.0, margin_weight=0.0, pkt_weight=0.0, temperature=1.0
    )
    params = [transform.stem.weight, transform.out.weight, transform.out.bias]
    grads = torch.autograd.grad(objective(), params)
    assert all(g.abs().max() > 0 for g in grads)
    for param, grad in zip(params, grads, strict=True):
        flat = grad.flatten().abs()
        for k in flat.topk(min(2, flat.numel())).indices.tolist():
            index = tuple(torch.unravel_index(torch.tensor(k), grad.shape))
            index = tuple(int(i) for i in index)
            numeric = _finite_difference(param, index, objective)
            assert grad[index].item() == pytest.approx(numeric, rel=1e-4, abs=1e-14)


def test_without_the_inner_step_the_kl_term_does_not_depend_on_the_transform():
    transform, objective = _setup(inner_lr=0.0, kl_weight=1.0, margin_weight=0.0, pkt_weight=0.0)
    loss = objective()
    assert loss.item() > 0
    grads = torch.autograd.grad(loss, list(transform.parameters()), allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def test_full_outer_loss_gradient_matches_finite_differences():
    transform, objective = _setup(
        inner_lr=1.0, kl_weight=5.0, margin_weight=0.5, pkt_weight=100.0, margin=10.0
    )
    (grad,) = torch.autograd.grad(objective(), [transform.out.weight])
    for index in ((0, 0, 0, 0), (0, 2, 1, 1), (0, 3, 2, 0)):
        numeric = _finite_difference(transform.out.weight, index, objective)
        assert grad[index].item() == pytest.approx(numeric, rel=1e-4, abs=1e-10)


def test_pkt_loss_is_zero_for_the_same_similarity_structure_only():
    torch.manual_seed(0)
    a = torch.randn(8, 5)
    assert pkt_loss(a, a).item() == pytest.approx(0.0, abs=1e-7)
    assert pkt_loss(3 * a, a).item() == pytest.approx(0.0, abs=1e-7)  # cosine: scale-free
    assert pkt_loss(torch.randn(8, 5), a).item() > 1e-4


def test_transform_net_size_follows_the_config():
    small = TransformNet(3, hidden=4, num_blocks=0)
    large = TransformNet(3, hidden=8, num_blocks=3)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in large.parameters())
    assert small(torch.rand(2, 3, 8, 8)).shape == (2, 3, 8, 8)

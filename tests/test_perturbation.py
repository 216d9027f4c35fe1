"""The weight-perturbation core: directions, local gradients, exact restore, BatchNorm, GradScaler."""

import contextlib

import pytest
import torch
from torch import nn

from hf_extensions.mixed_precision import fp16_loss_scaling
from hf_extensions.models import tiny_mlp_classifier
from hf_extensions.perturbation import (
    NORM_EPS,
    ascent_direction,
    combine_directions,
    direction_norm,
    frozen_batchnorm_statistics,
    local_gradients,
    loss_scaler,
    perturbed_weights,
    trainable_parameters,
)


def _batch(rows=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 64, generator=generator), torch.randint(
        0, 10, (rows,), generator=generator
    )


def _loss_fn(model, features, labels):
    return lambda: model(features, labels)["loss"]


def _gradients(model, features, labels):
    params = trainable_parameters(model)
    return list(torch.autograd.grad(model(features, labels)["loss"], params))


def test_sam_direction_has_radius_rho_along_the_gradient():
    model = tiny_mlp_classifier()
    grads = _gradients(model, *_batch())
    direction = ascent_direction(grads, trainable_parameters(model), rho=0.3)
    flat_g = torch.cat([g.flatten() for g in grads])
    flat_e = torch.cat([e.flatten() for e in direction])
    assert float(direction_norm(direction)) == pytest.approx(0.3, rel=1e-6)
    torch.testing.assert_close(flat_e, 0.3 * flat_g / flat_g.norm(), rtol=1e-6, atol=1e-9)


def test_per_tensor_norm_gives_every_tensor_radius_rho():
    model = tiny_mlp_classifier()
    grads = _gradients(model, *_batch())
    direction = ascent_direction(grads, trainable_parameters(model), rho=0.2, norm="per_tensor")
    for e, g in zip(direction, grads):
        assert float(e.norm()) == pytest.approx(0.2, rel=1e-5)
        torch.testing.assert_close(e, 0.2 * g / g.norm())


def test_adaptive_direction_is_asam_formula_and_scale_invariant():
    model = tiny_mlp_classifier()
    params = trainable_parameters(model)
    grads = _gradients(model, *_batch())
    direction = ascent_direction(grads, params, rho=0.5, adaptive=True, adaptive_eta=0.0)
    scaled = torch.cat([(p.abs() * g).flatten() for p, g in zip(params, grads)])
    expected = [0.5 * p.abs() ** 2 * g / scaled.norm() for p, g in zip(params, grads)]
    for e, x in zip(direction, expected):
        torch.testing.assert_close(e, x)
    # ASAM's point (Kwon et al., Sec. 3): rescaling a weight by c and its gradient by 1/c (what a
    # scale-symmetric network does) rescales the perturbation of that weight by c.
    c = 4.0
    moved = [p.detach() * c if i == 0 else p.detach() for i, p in enumerate(params)]
    moved_grads = [g / c if i == 0 else g for i, g in enumerate(grads)]
    again = ascent_direction(moved_grads, moved, rho=0.5, adaptive=True, adaptive_eta=0.0)
    torch.testing.assert_close(again[0], c * direction[0])


def test_zero_and_non_finite_gradients_give_no_perturbation_and_no_nan():
    model = tiny_mlp_classifier()
    params = trainable_parameters(model)
    zeros = [torch.zeros_like(p) for p in params]
    for grads in (
        zeros,
        [g.clone().fill_(float("inf")) if i == 1 else g for i, g in enumerate(zeros)],
    ):
        direction = ascent_direction(grads, params, rho=0.05)
        assert all(torch.equal(e, torch.zeros_like(e)) for e in direction)
    # A gradient just above zero is not amplified past the radius.
    tiny = [torch.full_like(p, NORM_EPS) for p in params]
    assert float(direction_norm(ascent_direction(tiny, params, rho=0.05))) <= 0.05 + 1e-9


def test_missing_gradients_stay_missing_and_combine():
    model = tiny_mlp_classifier()
    params = trainable_parameters(model)
    grads = _gradients(model, *_batch())
    grads[0] = None
    direction = ascent_direction(grads, params, rho=0.1)
    assert direction[0] is None
    combined = combine_directions((1.0, direction), (-1.0, direction))
    assert combined[0] is None
    assert all(torch.equal(c, torch.zeros_like(c)) for c in combined[1:])
    with pytest.raises(ValueError, match="norm"):
        ascent_direction(grads, params, rho=0.1, norm="l1")


def test_local_gradients_leave_accumulated_gradients_untouched():
    model = tiny_mlp_classifier()
    params = trainable_parameters(model)
    features, labels = _batch()
    model(*_batch(seed=1))["loss"].backward()  # an earlier micro-batch's gradient
    before = [p.grad for p in params]
    values = [g.clone() for g in before]
    loss, grads = local_gradients(_loss_fn(model, features, labels), params)
    assert all(p.grad is g for p, g in zip(params, before))
    assert all(torch.equal(p.grad, v) for p, v in zip(params, values))
    for g, expected in zip(grads, _gradients(model, features, labels)):
        torch.testing.assert_close(g, expected)
    assert float(loss) == pytest.approx(float(model(features, labels)["loss"].detach()))


def test_local_gradients_are_unscaled_and_leave_the_scaler_usable():
    """fp16 GradScaler path: true gradients from scaled ones, and one ``unscale_`` still allowed."""
    model = tiny_mlp_classifier()
    reference = tiny_mlp_classifier()
    features, labels = _batch()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    params = trainable_parameters(model)
    _, grads = local_gradients(_loss_fn(model, features, labels), params, scaler=scaler)
    for g, expected in zip(grads, _gradients(model, features, labels)):
        torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-9)
    # The rest of a SAM step under the scaler equals the same step in plain fp32.
    optimizer = torch.optim.SGD(params, lr=0.5)
    with perturbed_weights(params, ascent_direction(grads, params, rho=0.05)):
        scaler.scale(model(features, labels)["loss"]).backward()
    scaler.unscale_(optimizer)  # the Trainer's gradient clipping does exactly this
    scaler.step(optimizer)
    ref_params = trainable_parameters(reference)
    ref_grads = _gradients(reference, features, labels)
    with perturbed_weights(ref_params, ascent_direction(ref_grads, ref_params, rho=0.05)):
        reference(features, labels)["loss"].backward()
    torch.optim.SGD(ref_params, lr=0.5).step()
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_perturbed_weights_restore_exactly_even_after_an_error():
    model = tiny_mlp_classifier()
    params = trainable_parameters(model)
    original = [p.detach().clone() for p in params]
    direction = [torch.full_like(p, 0.1234567) for p in params]
    with perturbed_weights(params, direction):
        for p, o, e in zip(params, original, direction):
            torch.testing.assert_close(p.detach(), o + e)
    assert all(torch.equal(p, o) for p, o in zip(params, original))
    with pytest.raises(RuntimeError, match="boom"), perturbed_weights(params, direction):
        raise RuntimeError("boom")
    assert all(torch.equal(p, o) for p, o in zip(params, original))
    with pytest.raises(ValueError, match="entries"), perturbed_weights(params, direction[:-1]):
        pass


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_statistics_frozen_at_perturbed_weights(momentum):
    model = tiny_mlp_classifier(batchnorm=True).train()
    batchnorm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    batchnorm.momentum = momentum
    features, labels = _batch()
    params = trainable_parameters(model)
    direction = [torch.full_like(p, 0.01) for p in params]
    before = [b.clone() for b in batchnorm.buffers()]
    with perturbed_weights(params, direction, model=model):
        model(features, labels)
    assert all(torch.equal(b, c) for b, c in zip(batchnorm.buffers(), before))
    with perturbed_weights(params, direction, model=model, freeze_batchnorm_stats=False):
        model(features, labels)
    assert not torch.equal(batchnorm.running_mean, before[0])
    with frozen_batchnorm_statistics(model, enabled=True):
        model(features, labels)
    assert int(batchnorm.num_batches_tracked) == 1


def _accelerated_gradients(accelerator, model, features, labels):
    for p in model.parameters():
        p.grad = None
    accelerator.backward(model(features, labels)["loss"])
    grads = [p.grad.clone() for p in trainable_parameters(model)]
    for p in model.parameters():
        p.grad = None
    return grads


@pytest.mark.parametrize("fp16", [False, True])
def test_loss_scaler_decides_as_accelerate_backward_does(fp16):
    """The core scales (and unscales) a local pass exactly when ``accelerator.backward`` scales
    the loss: its gradients are the true ones whether or not loss scaling is active."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny_mlp_classifier()
    features, labels = _batch()
    params = trainable_parameters(model)
    true = _gradients(model, features, labels)
    with (
        fp16_loss_scaling(accelerator, init_scale=2.0**8, autocast=False)
        if fp16
        else contextlib.nullcontext()
    ):
        scaler = loss_scaler(accelerator)
        assert (scaler is not None) == fp16
        # what accelerate's backward puts in p.grad: the gradient times the active scale
        factor = 2.0**8 if fp16 else 1.0
        for g, t in zip(_accelerated_gradients(accelerator, model, features, labels), true):
            torch.testing.assert_close(g, t * factor, rtol=1e-6, atol=1e-9)
        _, grads = local_gradients(
            _loss_fn(model, features, labels), params, accelerator=accelerator, scaler=scaler
        )
    for g, t in zip(grads, true):
        torch.testing.assert_close(g, t, rtol=1e-6, atol=1e-9)


def test_loss_scaler_refuses_a_scaler_accelerate_would_not_unscale():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu")
    try:
        with pytest.raises(ValueError, match=r"fp16=True"):
            loss_scaler(accelerator)
    finally:
        accelerator.scaler = None

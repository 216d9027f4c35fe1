"""Unit checks of the PTQ fake quantizers (fake-quant formula, grid search, AdaRound, LSQ, QDrop)."""

import math

import pytest
import torch

from hf_extensions.quantization import (
    ActivationQuantizer,
    WeightQuantizer,
    clamp_ste,
    fake_quantize,
    lp_error,
    minmax_scale_zero_point,
    search_scale_zero_point,
)


def test_fake_quantize_matches_hand_computation():
    x = torch.tensor([-1.0, -0.26, 0.0, 0.24, 0.76, 3.0])
    # scale 0.5, zero point 2, 2 bits (q in 0..3): representable values are -1, -0.5, 0, 0.5.
    out = fake_quantize(x, 0.5, 2.0, 0, 3)
    # -1 -> q=0 -> -1; -0.26/0.5=-0.52 -> round -1 -> q=1 -> -0.5; 0 -> 0; 0.48 -> 0 -> 0;
    # 1.52 -> 2 -> q=4 clipped to 3 -> 0.5; 6 -> q=8 clipped to 3 -> 0.5.
    assert torch.equal(out, torch.tensor([-1.0, -0.5, 0.0, 0.0, 0.5, 0.5]))


def test_fake_quantize_per_channel_matches_hand_computation():
    x = torch.tensor([[0.3, -0.3, 1.0], [3.0, -3.0, 10.0]])
    scale = torch.tensor([0.1, 1.0])
    zero_point = torch.tensor([1.0, 3.0])
    out = fake_quantize(x, scale, zero_point, 0, 7, axis=0)
    # row 0: q = round(x/0.1)+1 = 4, -2 -> 0, 11 -> 7; x_hat = (q-1)*0.1 = 0.3, -0.1, 0.6
    # row 1: q = round(x)+3 = 6, 0, 13 -> 7; x_hat = (q-3) = 3, -3, 4
    expected = torch.tensor([[0.3, -0.1, 0.6], [3.0, -3.0, 4.0]])
    torch.testing.assert_close(out, expected)
    # Axis 1 (columns) gives a different answer from axis 0 for the same per-channel numbers.
    out_t = fake_quantize(x.t(), scale, zero_point, 0, 7, axis=1)
    torch.testing.assert_close(out_t, expected.t())


def test_fake_quantize_round_trips_representable_values_exactly():
    scale, zero_point = 0.0625, 7.0
    q = torch.arange(0, 16, dtype=torch.float32)
    x = (q - zero_point) * scale
    assert torch.equal(fake_quantize(x, scale, zero_point, 0, 15), x)
    # ...and is idempotent on arbitrary inputs.
    y = torch.randn(100)
    once = fake_quantize(y, scale, zero_point, 0, 15)
    assert torch.equal(fake_quantize(once, scale, zero_point, 0, 15), once)


def test_clamp_ste_passes_the_gradient_on_the_closed_range_only():
    """Values on the end points keep gradient 1 (torch 2.14's clamp gives 0 or 1/2 there)."""
    q = torch.tensor([-1.0, 0.0, 1.5, 3.0, 3.5], requires_grad=True)
    clamp_ste(q, 0, 3).sum().backward()
    assert torch.equal(q.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    assert torch.equal(clamp_ste(q, 0, 3), q.detach().clamp(0, 3))


def test_ste_gradient_is_one_inside_and_zero_outside_range():
    # Range with scale 0.5, zero point 2, q in 0..3: [-1, 0.5].
    x = torch.tensor([-3.0, -0.9, -0.3, 0.1, 0.4, 2.0], requires_grad=True)
    fake_quantize(x, 0.5, 2.0, 0, 3).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]))


def test_per_channel_scales_differ_per_channel():
    w = torch.randn(3, 64) * torch.tensor([[0.01], [1.0], [100.0]])
    q = WeightQuantizer(bits=4).calibrate(w)
    assert q.scale.shape == (3,)
    assert q.scale[0] < q.scale[1] < q.scale[2]
    ratio = (q.scale[2] / q.scale[0]).item()
    assert 1e3 < ratio < 1e5  # tracks the 1e4 ratio of channel magnitudes
    # Per-channel beats one per-tensor range on the small channel by orders of magnitude.
    s, z = minmax_scale_zero_point(w.min(), w.max(), 0, 15)
    per_tensor_err = lp_error(w[0], fake_quantize(w[0], s, z, 0, 15))
    per_channel_err = lp_error(w[0], q(w)[0])
    assert per_channel_err < 1e-2 * per_tensor_err  # measured: about 290x smaller


def test_grid_search_clip_beats_min_max_on_heavy_tailed_tensor():
    w = torch.distributions.StudentT(torch.tensor(2.0)).sample((8, 512))
    # Measured ratios of grid-searched to min/max Lp error: 0.78 (W2), 0.90 (W4).
    for bits, max_ratio in ((2, 0.85), (4, 0.95)):
        qmax = 2**bits - 1
        mm_scale, mm_zp = minmax_scale_zero_point(w.min(dim=1).values, w.max(dim=1).values, 0, qmax)
        mm_err = lp_error(w, fake_quantize(w, mm_scale, mm_zp, 0, qmax, axis=0), 2.4, axis=0)
        gs_scale, gs_zp = search_scale_zero_point(w, 0, qmax, axis=0)
        gs_err = lp_error(w, fake_quantize(w, gs_scale, gs_zp, 0, qmax, axis=0), 2.4, axis=0)
        assert torch.all(gs_err <= mm_err)  # never worse, per channel (min/max is a candidate)
        assert gs_err.sum() < max_ratio * mm_err.sum()
        assert torch.all(gs_scale < mm_scale)  # heavy tails: every channel clips


def test_weight_error_decreases_monotonically_with_bits():
    w = torch.randn(16, 8, 3, 3)
    errors = {b: lp_error(w, WeightQuantizer(bits=b).calibrate(w)(w), 2).item() for b in (2, 4, 8)}
    assert errors[8] < errors[4] < errors[2]
    assert errors[8] < 0.01 * errors[4]
    relative_w8 = math.sqrt(errors[8] / w.pow(2).sum().item())
    assert relative_w8 < 0.01


def test_adaround_initial_soft_output_equals_full_precision_weight():
    w = torch.randn(6, 40)
    # Soft output equals W wherever W is inside the quantization range. With min/max that is
    # nearly every weight (the integer zero point can shift the grid by up to half a step, so
    # an extreme weight may fall just outside); with the clipping grid search, fewer.
    for grid_size, min_inside in ((1, 0.9), (80, 0.5)):
        q = WeightQuantizer(bits=3, grid_size=grid_size).calibrate(w).init_adaround(w)
        lo = (q.qmin - q.zero_point[:, None]) * q.scale[:, None]
        hi = (q.qmax - q.zero_point[:, None]) * q.scale[:, None]
        inside = (w >= lo) & (w <= hi)
        assert inside.float().mean() > min_inside
        torch.testing.assert_close(q(w)[inside], w[inside], rtol=0, atol=1e-5)
        nearest = q.set_mode("nearest")(w)
        assert (nearest - w)[inside].abs().max() > 0.3 * q.scale.min()  # nearest rounding differs


def test_adaround_hard_rounding_within_one_step_of_nearest():
    w = torch.randn(5, 30, 3)
    q = WeightQuantizer(bits=4).calibrate(w).init_adaround(w)
    nearest = q.set_mode("nearest")(w)
    step = q.scale[:, None, None]
    # At initialisation hard rounding is round-to-nearest (h(V) >= 0.5 iff the fraction >= 0.5).
    assert torch.allclose(q.set_mode("hard")(w), nearest, atol=1e-6)
    # After arbitrary updates of V it rounds up or down: within one step, and it did change.
    with torch.no_grad():
        q.alpha.add_(torch.randn_like(q.alpha) * 5)
    hard = q.set_mode("hard")(w)
    diff = (hard - nearest).abs()
    assert torch.all(diff <= step * (1 + 1e-5))
    assert (diff > 0.5 * step).any()
    # Hard values lie on the integer grid.
    grid = hard / step + q.zero_point[:, None, None]
    torch.testing.assert_close(grid, grid.round(), rtol=0, atol=1e-4)


def test_adaround_regularizer_matches_formula_and_vanishes_at_hard_values():
    w = torch.randn(4, 10)
    q = WeightQuantizer(bits=4).calibrate(w).init_adaround(w)
    h = q.rectified_sigmoid()
    expected = (1 - (2 * h - 1).abs().pow(3.0)).sum()
    torch.testing.assert_close(q.rounding_regularizer(3.0), expected)
    assert q.rounding_regularizer(3.0) > 1.0
    with torch.no_grad():
        q.alpha.copy_(torch.sign(q.alpha) * 20)  # saturate: h in {0, 1}
    assert q.rounding_regularizer(3.0).item() == 0.0


def test_lsq_step_gradient_has_lsq_scale():
    q = ActivationQuantizer(bits=4, drop_prob=0.0).calibrate(torch.randn(4, 3, 5))
    x = torch.randn(4, 3, 5) * 2  # wider than the calibration data: some values clip
    q(x).sum().backward()
    s, z = q.step.detach(), q.zero_point
    v = torch.round(x / s) + z
    # LSQ Eq. 3 with a zero point: -x/s + round(x/s) inside, q_min - z / q_max - z when clipped.
    per_element = torch.where(
        v < q.qmin, q.qmin - z, torch.where(v > q.qmax, q.qmax - z, torch.round(x / s) - x / s)
    )
    g = 1 / math.sqrt(15 * 15)  # N = 3 * 5 features per example, Q_P = 15
    torch.testing.assert_close(q.step.grad, g * per_element.sum())
    assert q.gradient_scale(x) == pytest.approx(g)
    assert (v < q.qmin).any() or (v > q.qmax).any()  # the clipped branch is exercised


def test_activation_calibration_initialises_step_from_data():
    x = torch.rand(8, 32) * 6
    q = ActivationQuantizer(bits=8).calibrate(x)
    assert q.step.item() == pytest.approx(6 / 255, rel=0.2)
    assert q.zero_point.item() == 0.0  # non-negative data: range starts at 0
    with pytest.raises(RuntimeError, match="calibrate"):
        ActivationQuantizer()(x)


def test_qdrop_mixing_probabilities_and_eval_mode():
    x = torch.randn(64, 32)
    q = ActivationQuantizer(bits=2, drop_prob=0.0).calibrate(x).train()
    full = q.quantize(x)
    assert not torch.allclose(full, x)
    assert torch.equal(q(x), full)  # p = 0: every element quantized
    q.drop_prob = 1.0
    assert torch.equal(q(x), x)  # p = 1: identity
    q.drop_prob = 0.5
    mixed = q(x)
    is_fp = (mixed == x) & (full != x)
    is_q = (mixed == full) & (full != x)
    differs = full != x
    assert torch.all(is_fp | is_q | ~differs)
    fraction_fp = is_fp.sum().item() / differs.sum().item()
    assert 0.45 < fraction_fp < 0.55
    q.eval()
    assert torch.equal(q(x), full)  # eval: always quantized
    q.drop_prob = 1.0
    assert torch.equal(q(x), full)


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0, True, "4"])
def test_bad_bits_raise_value_error_naming_the_field(bits):
    with pytest.raises(ValueError, match="bits"):
        WeightQuantizer(bits=bits)
    with pytest.raises(ValueError, match="bits"):
        ActivationQuantizer(bits=bits)


def test_other_bad_settings_raise_value_error_naming_the_field():
    with pytest.raises(ValueError, match="drop_prob"):
        ActivationQuantizer(drop_prob=1.5)
    with pytest.raises(ValueError, match="grid_size"):
        WeightQuantizer(grid_size=0)
    with pytest.raises(ValueError, match="mode"):
        WeightQuantizer().set_mode("stochastic")
    for bits in (2, 8):
        assert WeightQuantizer(bits=bits).qmax == 2**bits - 1


def test_grid_search_chooses_each_channel_clip_independently():
    w = torch.stack([torch.linspace(-1, 1, 512), torch.randn(512)])
    torch.testing.assert_close(lp_error(w, torch.zeros_like(w), 2.0, axis=0), w.pow(2).sum(dim=1))
    scale, _ = search_scale_zero_point(w, 0, 15, axis=0)
    mm_scale, _ = minmax_scale_zero_point(w.min(dim=1).values, w.max(dim=1).values, 0, 15)
    ratio = scale / mm_scale
    # Measured over seeds 0-2: uniform 1.0, Gaussian 0.82-0.85 of the min/max range.
    assert ratio[0] > 0.97  # uniform channel: its full range
    assert ratio[1] < 0.9  # Gaussian channel: its tails are clipped

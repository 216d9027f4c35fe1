"""Uniform affine fake quantizers for post-training quantization (PTQ).

Building blocks for the block-reconstruction PTQ methods that MetaAug (Pham et al., ECCV 2024,
arXiv 2407.14726) builds on:

* :func:`fake_quantize` -- asymmetric uniform quantize/dequantize with a straight-through
  estimator (Bengio et al. 2013) for the rounding,
  ``x_hat = s * (clip(round(x / s) + z, q_min, q_max) - z)``.
* :class:`WeightQuantizer` -- per-output-channel asymmetric weights whose clipping range is found
  by a grid search minimising ``||W - Q(W)||_p^p`` (the BRECQ / QDrop convention, Li et al. 2021,
  Wei et al. 2022; p = 2.4 as in their code), with AdaRound (Nagel et al. 2020, "Up or Down?
  Adaptive Rounding for Post-Training Quantization") soft and hard rounding.
* :class:`ActivationQuantizer` -- per-tensor asymmetric activations with an LSQ learnable step
  (Esser et al. 2020, "Learned Step Size Quantization") and QDrop random dropping of quantization
  (Wei et al. 2022, "QDrop: Randomly Dropping Quantization for Extremely Low-bit PTQ").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hf_extensions.validation import check_integer, refuse

__all__ = [
    "ActivationQuantizer",
    "WeightQuantizer",
    "clamp_ste",
    "fake_quantize",
    "grad_scale",
    "lp_error",
    "minmax_scale_zero_point",
    "round_ste",
    "search_scale_zero_point",
]

MIN_BITS = 2
MAX_BITS = 8


def _check_bits(name: str, value: object) -> int:
    return check_integer(name, value, low=MIN_BITS, high=MAX_BITS)


def _check(name: str, value: object, ok: bool, allowed: str) -> None:
    if not ok:
        refuse(name, allowed, value)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest in the forward pass, identity gradient in the backward pass (STE)."""
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Return ``x`` unchanged in the forward pass with its gradient multiplied by ``scale``.

    LSQ (Esser et al. 2020, Sec. 2.2) scales the step-size gradient by ``g = 1 / sqrt(N * Q_P)``.
    """
    y = x * scale
    return (x - y).detach() + y


def _expand(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Shape a per-channel vector ``t`` to broadcast against ``x`` along ``axis``."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def clamp_ste(q: torch.Tensor, qmin: float, qmax: float) -> torch.Tensor:
    """``clip(q, q_min, q_max)`` whose gradient is 1 on the closed range and 0 outside it.

    The STE's clipping (LSQ / BRECQ) passes the gradient for every value on the grid, the two
    end points included. ``torch.clamp`` gave exactly that up to torch 2.13; torch 2.14 gives 0
    (scalar bounds) or 1/2 (tensor bounds) at a value equal to a bound, which is where
    quantized values sit. The explicit mask keeps one behaviour on every release.
    """
    inside = (q >= qmin) & (q <= qmax)
    return torch.where(inside, q, q.detach().clamp(qmin, qmax))


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero_point: torch.Tensor | float,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Asymmetric uniform fake quantization with a straight-through estimator.

    ``x_hat = s * (clip(round(x / s) + z, q_min, q_max) - z)`` (BRECQ Eq. 1 / LSQ Eq. 1 with an
    integer zero point ``z``). ``scale`` and ``zero_point`` are scalars (per-tensor) or vectors
    with one entry per slice of ``x`` along ``axis`` (per-channel). The rounding uses the STE, so
    ``d x_hat / d x`` is 1 where ``q_min <= round(x / s) + z <= q_max`` and 0 where the value is
    clipped; the gradient reaching ``scale`` is LSQ's (Esser et al. 2020, Eq. 3).
    """
    s = _expand(scale, x, axis)
    z = _expand(zero_point, x, axis)
    q = clamp_ste(round_ste(x / s) + z, qmin, qmax)
    return (q - z) * s


def lp_error(
    x: torch.Tensor, x_hat: torch.Tensor, p: float = 2.4, axis: int | None = None
) -> torch.Tensor:
    """``sum |x - x_hat|^p`` over all elements (``axis=None``) or per slice along ``axis``."""
    err = (x - x_hat).abs().pow(p)
    if axis is None:
        return err.sum()
    return err.transpose(0, axis).reshape(x.shape[axis], -1).sum(dim=1)


def _channel_min_max(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if axis is None:
        return x.min(), x.max()
    flat = x.detach().transpose(0, axis).reshape(x.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


def minmax_scale_zero_point(
    x_min: torch.Tensor, x_max: torch.Tensor, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point mapping ``[min(x_min, 0), max(x_max, 0)]`` to ``[q_min, q_max]``.

    As BRECQ's ``UniformAffineQuantizer``: ``s = (max - min) / (q_max - q_min)``,
    ``z = q_min - round(min / s)``; the range always contains 0 so that 0 is exactly representable.
    """
    x_min = torch.clamp(x_min, max=0.0)
    x_max = torch.clamp(x_max, min=0.0)
    scale = torch.clamp((x_max - x_min) / (qmax - qmin), min=1e-8)
    zero_point = qmin - torch.round(x_min / scale)
    return scale, zero_point


def search_scale_zero_point(
    x: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    p: float = 2.4,
    grid_size: int = 80,
    grid_step: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid search of the clipping range minimising ``||x - Q(x)||_p^p`` (per channel if ``axis``).

    Candidate ranges are ``[(1 - i * grid_step) * min, (1 - i * grid_step) * max]`` for
    ``i = 0 .. grid_size - 1``; ``i = 0`` is the min/max range. This is the ``scale_method='mse'``
    initialisation of the BRECQ / QDrop code (80 candidates, step 0.01, ``lp_loss`` with p = 2.4);
    here all channels are searched at once instead of in a Python loop over channels.
    """
    x = x.detach()
    x_min, x_max = _channel_min_max(x, axis)
    best_scale, best_zp = minmax_scale_zero_point(x_min, x_max, qmin, qmax)
    best_err = lp_error(x, fake_quantize(x, best_scale, best_zp, qmin, qmax, axis), p, axis)
    for i in range(1, grid_size):
        ratio = 1.0 - i * grid_step
        if ratio <= 0:
            break
        scale, zp = minmax_scale_zero_point(x_min * ratio, x_max * ratio, qmin, qmax)
        err = lp_error(x, fake_quantize(x, scale, zp, qmin, qmax, axis), p, axis)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


class WeightQuantizer(nn.Module):
    """Per-output-channel asymmetric ``bits``-bit weight quantizer with optional AdaRound.

    Call :meth:`calibrate` with the full-precision weight to set ``scale`` and ``zero_point`` by
    :func:`search_scale_zero_point` (``||W - Q(W)||_p^p`` grid search, p = 2.4 as in the BRECQ /
    QDrop code; ``grid_size=1`` gives plain min/max). Modes (``self.mode``):

    * ``"nearest"`` -- round-to-nearest fake quantization (:func:`fake_quantize`).
    * ``"soft"`` -- AdaRound (Nagel et al. 2020, Eq. 22-23): ``W_hat = s * (clip(floor(W / s) +
      h(V) + z, q_min, q_max) - z)`` with the rectified sigmoid
      ``h(V) = clip(sigmoid(V) * (ζ - γ) + γ, 0, 1)``, ζ = 1.1, γ = -0.1. :meth:`init_adaround`
      sets ``V`` so that ``h(V)`` equals the fractional part of ``W / s``, i.e. the soft output
      starts at the full-precision weight (inside the clipping range).
    * ``"hard"`` -- AdaRound after optimisation: ``h(V)`` replaced by ``1[h(V) >= 0.5]``, so each
      weight is rounded down or up; hence within one step ``s`` of round-to-nearest.

    :meth:`rounding_regularizer` is AdaRound's Eq. 24, ``sum(1 - |2 h(V) - 1|^β)``. As in the
    BRECQ code, the scale is fixed while ``V`` is learned, unless :meth:`learn_scale` makes it a
    parameter too (Genie-M).
    """

    def __init__(
        self,
        bits: int = 4,
        channel_axis: int = 0,
        p: float = 2.4,
        grid_size: int = 80,
        zeta: float = 1.1,
        gamma: float = -0.1,
    ) -> None:
        super().__init__()
        self.bits = _check_bits("bits", bits)
        _check("p", p, isinstance(p, (int, float)) and p > 0, "a number > 0")
        _check("grid_size", grid_size, isinstance(grid_size, int) and grid_size >= 1, "an int >= 1")
        _check("zeta", zeta, zeta > 1, "a number > 1")
        _check("gamma", gamma, gamma < 0, "a number < 0")
        self.channel_axis = channel_axis
        self.p = float(p)
        self.grid_size = grid_size
        self.zeta = zeta
        self.gamma = gamma
        self.qmin = 0
        self.qmax = 2**bits - 1
        self.mode = "nearest"
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.register_buffer("floor_scale", None)
        self.alpha: nn.Parameter | None = None

    @torch.no_grad()
    def calibrate(self, weight: torch.Tensor) -> WeightQuantizer:
        """Set the per-channel scale and zero point by the Lp clipping-range grid search."""
        scale, zero_point = search_scale_zero_point(
            weight, self.qmin, self.qmax, self.channel_axis, self.p, self.grid_size
        )
        self.scale = scale
        self.zero_point = zero_point
        return self

    def _require_calibrated(self) -> None:
        if self.scale is None:
            raise RuntimeError("WeightQuantizer is not calibrated: call calibrate(weight) first")

    @torch.no_grad()
    def init_adaround(self, weight: torch.Tensor) -> WeightQuantizer:
        """Create ``V`` (``self.alpha``) with ``h(V) = W / s - floor(W / s)`` and switch to soft mode.

        Inverting the rectified sigmoid: ``V = -log((ζ - γ) / (rest - γ) - 1)`` (AdaRound's and
        BRECQ's ``init_alpha``).
        """
        self._require_calibrated()
        w_s = weight.detach() / _expand(self.scale, weight, self.channel_axis)
        rest = w_s - torch.floor(w_s)
        alpha = -torch.log((self.zeta - self.gamma) / (rest - self.gamma) - 1)
        self.alpha = nn.Parameter(alpha)
        self.mode = "soft"
        return self

    def learn_scale(self) -> nn.Parameter:
        """Make ``scale`` a parameter learned with ``V`` (Genie-M, Jeon et al., CVPR 2023).

        The integer grid point below each weight stays the one of the initial scale
        (``floor(W / s_0)``, kept in ``floor_scale``), and the learned ``s`` multiplies the
        rounded integer: ``W_hat = s * (clip(floor(W / s_0) + h(V) + z, q_min, q_max) - z)``.
        At ``s = s_0`` this is the fixed-scale AdaRound of :meth:`forward`.
        """
        self._require_calibrated()
        self.floor_scale = self.scale.detach().clone()
        self.scale = nn.Parameter(self.scale.detach().clone())
        return self.scale

    def rectified_sigmoid(self) -> torch.Tensor:
        """``h(V) = clip(sigmoid(V) * (ζ - γ) + γ, 0, 1)`` (AdaRound Eq. 23)."""
        if self.alpha is None:
            raise RuntimeError("AdaRound is not initialised: call init_adaround(weight) first")
        return torch.clamp(torch.sigmoid(self.alpha) * (self.zeta - self.gamma) + self.gamma, 0, 1)

    def rounding_regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(V) - 1|^β)`` (AdaRound Eq. 24); 0 once every ``h(V)`` is 0 or 1."""
        return (1 - (2 * self.rectified_sigmoid() - 1).abs().pow(beta)).sum()

    def set_mode(self, mode: str) -> WeightQuantizer:
        """Switch between ``"nearest"``, ``"soft"`` and ``"hard"`` rounding."""
        _check("mode", mode, mode in ("nearest", "soft", "hard"), "'nearest', 'soft', 'hard'")
        if mode != "nearest" and self.alpha is None:
            raise RuntimeError(f"mode={mode!r} needs AdaRound: call init_adaround(weight) first")
        self.mode = mode
        return self

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self._require_calibrated()
        if self.mode == "nearest":
            return fake_quantize(
                weight, self.scale, self.zero_point, self.qmin, self.qmax, self.channel_axis
            )
        s = _expand(self.scale, weight, self.channel_axis)
        z = _expand(self.zero_point, weight, self.channel_axis)
        base = (
            s if self.floor_scale is None else _expand(self.floor_scale, weight, self.channel_axis)
        )
        w_floor = torch.floor(weight / base.detach())
        h = self.rectified_sigmoid()
        if self.mode == "hard":
            h = (h >= 0.5).to(weight.dtype)
        q = clamp_ste(w_floor + h + z, self.qmin, self.qmax)
        return (q - z) * s

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channel_axis={self.channel_axis}, p={self.p}, mode={self.mode}"


class ActivationQuantizer(nn.Module):
    """Per-tensor asymmetric ``bits``-bit activation quantizer: LSQ step with QDrop mixing.

    * LSQ (Esser et al. 2020): the step ``s`` is an ``nn.Parameter`` trained through
      :func:`fake_quantize`, its gradient scaled by ``g = 1 / sqrt(N * Q_P)`` (LSQ Sec. 2.2) with
      ``N`` the number of features of one example (``x[0].numel()``) and ``Q_P = q_max``.
      :meth:`calibrate` initialises ``s`` and the integer zero point ``z`` (kept fixed) from
      calibration activations by the same Lp grid search as the weights (the QDrop code's
      initialisation; LSQ's own ``2 <|x|> / sqrt(Q_P)`` assumes symmetric quantization).
    * QDrop (Wei et al. 2022, Eq. 8): in training mode each element is kept at full precision
      with probability ``drop_prob`` (p = 0.5 default) and quantized otherwise; in eval mode it is
      always quantized. ``drop_prob`` here is the probability of keeping full precision (the
      QDrop code's ``prob`` is the probability of quantizing: ``prob = 1 - drop_prob``).
    """

    def __init__(
        self, bits: int = 8, drop_prob: float = 0.5, p: float = 2.4, grid_size: int = 80
    ) -> None:
        super().__init__()
        self.bits = _check_bits("bits", bits)
        _check(
            "drop_prob",
            drop_prob,
            isinstance(drop_prob, (int, float)) and 0.0 <= drop_prob <= 1.0,
            "a number in [0, 1]",
        )
        _check("p", p, isinstance(p, (int, float)) and p > 0, "a number > 0")
        _check("grid_size", grid_size, isinstance(grid_size, int) and grid_size >= 1, "an int >= 1")
        self.drop_prob = float(drop_prob)
        self.p = float(p)
        self.grid_size = grid_size
        self.qmin = 0
        self.qmax = 2**bits - 1
        # host: buffers at construction; they move with the module
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0.0))  # host: as above
        self.register_buffer("calibrated", torch.tensor(False))  # host: as above

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> ActivationQuantizer:
        """Initialise the step and zero point from calibration activations ``x``."""
        scale, zero_point = search_scale_zero_point(
            x, self.qmin, self.qmax, None, self.p, self.grid_size
        )
        self.step.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.calibrated.fill_(True)
        return self

    def gradient_scale(self, x: torch.Tensor) -> float:
        """LSQ's ``g = 1 / sqrt(N * Q_P)`` for a batch ``x`` (``N = x[0].numel()``)."""
        n = x[0].numel() if x.dim() > 1 else x.numel()
        return 1.0 / math.sqrt(n * self.qmax)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize every element (no QDrop mixing)."""
        if not bool(self.calibrated):
            raise RuntimeError("ActivationQuantizer is not calibrated: call calibrate(x) first")
        step = grad_scale(self.step, self.gradient_scale(x))
        return fake_quantize(x, step, self.zero_point, self.qmin, self.qmax)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = self.quantize(x)
        if not self.training or self.drop_prob == 0.0:
            return x_q
        keep_fp = torch.rand_like(x) < self.drop_prob
        return torch.where(keep_fp, x, x_q)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, drop_prob={self.drop_prob}, p={self.p}"

"""``MetaAugConfig``: the quantization config that a saved checkpoint's ``config.json`` carries.

Registered with ``transformers.quantizers.auto.register_quantization_config`` under
:data:`QUANT_METHOD`, so ``AutoModel*.from_pretrained`` resolves
``config.json["quantization_config"]["quant_method"]`` to this class once
``hf_extensions.quantization`` is imported. The method (BRECQ, Li et al. 2021; QDrop, Wei et al.
2022; MetaAug, Pham et al., ECCV 2024, arXiv 2407.14726) decides how the scales were calibrated;
the saved inference form (fake-quantized float weights plus per-channel scales and zero points)
is the same for all three.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    register_quantization_config,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from hf_extensions.quantization.quantizers import MAX_BITS, MIN_BITS

__all__ = ["METHODS", "QUANT_METHOD", "MetaAugConfig"]

QUANT_METHOD = "hf_extensions_metaaug"
METHODS = ("brecq", "qdrop", "metaaug")


def _bad(name: str, value: object, allowed: str) -> ValueError:
    return ValueError(f"{name}={value!r} is invalid; allowed: {allowed}")


def _is_bits(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and MIN_BITS <= value <= MAX_BITS


@dataclass
class MetaAugConfig(QuantizationConfigMixin):
    """Uniform affine post-training quantization of the ``nn.Linear`` / ``nn.Conv2d`` layers.

    * ``method`` -- how the scales were calibrated: ``"brecq"``, ``"qdrop"`` or ``"metaaug"``.
    * ``weight_bits`` -- per-output-channel asymmetric weight bits, 2..8.
    * ``activation_bits`` -- per-tensor asymmetric bits of each quantized layer's input, 2..8, or
      ``None`` for weight-only quantization.
    * ``first_last_8bit`` -- the BRECQ / QDrop convention: the first and the last quantized layer
      (in ``named_modules`` order) use 8-bit weights and 8-bit inputs.
    * ``quantize_first_layer_input`` -- with ``first_last_8bit``, whether the first layer's input
      (the image) is quantized to 8 bits too. The BRECQ / QDrop / MetaAug convention is ``False``
      (first layer W8 on the float image, last layer W8A8); ``True`` keeps the first layer W8A8.
    * ``modules_to_not_convert`` -- module names (exact, or a dotted prefix / suffix) kept in float.
      Unlike transformers' built-in quantizers no default skips (such as the output head) are
      added, so quantization and loading always convert the same modules.

    Calibration settings (recorded in ``config.json``; they do not change the saved form):

    * ``iterations`` / ``batch_size`` -- block reconstruction steps per block and batch (BRECQ /
      QDrop: 20000 and 32-64; the CPU defaults here are small).
    * ``weight_lr`` (AdaRound ``V``, Adam; 1e-3 in BRECQ for 20k steps, 5e-2 here: with a few
      hundred steps at 1e-3 ``h(V)`` never reaches 0 / 1 and the hard rounding is worse than
      round-to-nearest -- measured on the embedded CNN), ``activation_lr`` (LSQ steps, Adam + cosine decay to 0),
      ``rounding_weight`` (λ of AdaRound Eq. 25, 0.01), ``warmup`` (fraction of iterations without
      the rounding term, 0.2), ``beta_start`` / ``beta_end`` (β annealed 20 -> 2 after warm-up).
    * ``drop_prob`` -- QDrop probability of keeping an activation at full precision (0.5); used by
      ``"qdrop"`` and ``"metaaug"``; ``"brecq"`` always uses 0.
    * ``block_names`` -- the reconstruction units; ``None`` finds them (see
      :func:`~hf_extensions.quantization.reconstruction.find_blocks`), ``max_block_layers`` bounds
      how many quantized layers an automatically found block may hold.
    * MetaAug (``method="metaaug"``): ``meta_iterations`` (500 in the paper), ``meta_lr`` (Adam lr
      of the transformation network T), ``meta_grad_clip`` (0.1), ``inner_lr`` (the one
      differentiable SGD step), ``kl_weight`` a = 5, ``margin_weight`` b = 0.5, ``pkt_weight``
      c = 30000, ``margin`` τ = 0.1, ``temperature`` 4, and T's architecture:
      ``transform_channels`` / ``transform_blocks`` (a residual conv net,
      :class:`~hf_extensions.quantization.metaaug.TransformNet`).
    """

    method: str = "metaaug"
    weight_bits: int = 4
    activation_bits: int | None = 4
    first_last_8bit: bool = True
    quantize_first_layer_input: bool = True
    modules_to_not_convert: list[str] | None = None
    iterations: int = 200
    batch_size: int = 32
    weight_lr: float = 5e-2
    activation_lr: float = 4e-5
    rounding_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    drop_prob: float = 0.5
    block_names: list[str] | None = None
    max_block_layers: int = 8
    meta_iterations: int = 50
    meta_lr: float = 1e-3
    meta_grad_clip: float = 0.1
    inner_lr: float = 1e-2
    kl_weight: float = 5.0
    margin_weight: float = 0.5
    pkt_weight: float = 30000.0
    margin: float = 0.1
    temperature: float = 4.0
    transform_channels: int = 16
    transform_blocks: int = 2
    seed: int = 0
    quant_method: str = QUANT_METHOD

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise _bad("method", self.method, ", ".join(repr(m) for m in METHODS))
        if not _is_bits(self.weight_bits):
            raise _bad("weight_bits", self.weight_bits, f"an integer in {MIN_BITS}..{MAX_BITS}")
        if self.activation_bits is not None and not _is_bits(self.activation_bits):
            raise _bad(
                "activation_bits",
                self.activation_bits,
                f"an integer in {MIN_BITS}..{MAX_BITS} or None (weight-only)",
            )
        if not isinstance(self.first_last_8bit, bool):
            raise _bad("first_last_8bit", self.first_last_8bit, "True or False")
        if not isinstance(self.quantize_first_layer_input, bool):
            raise _bad(
                "quantize_first_layer_input", self.quantize_first_layer_input, "True or False"
            )
        for name in ("iterations", "batch_size", "max_block_layers", "transform_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _bad(name, value, "an integer >= 1")
        for name in ("meta_iterations", "transform_blocks", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _bad(name, value, "an integer >= 0")
        for name in (
            "weight_lr",
            "activation_lr",
            "rounding_weight",
            "beta_start",
            "beta_end",
            "meta_lr",
            "meta_grad_clip",
            "inner_lr",
            "kl_weight",
            "margin_weight",
            "pkt_weight",
            "margin",
            "temperature",
        ):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise _bad(name, value, "a finite number >= 0")
        if self.temperature == 0:
            raise _bad("temperature", self.temperature, "a number > 0")
        for name in ("warmup", "drop_prob"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value <= 1
            ):
                raise _bad(name, value, "a number in [0, 1]")
        blocks = self.block_names
        if blocks is not None:
            if isinstance(blocks, str) or not all(isinstance(n, str) and n for n in blocks):
                raise _bad("block_names", blocks, "None or a list of module names")
            self.block_names = list(blocks)
        names = self.modules_to_not_convert
        if names is not None:
            if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
                raise _bad("modules_to_not_convert", names, "None or a list of module names")
            self.modules_to_not_convert = list(names)
        if self.quant_method != QUANT_METHOD:
            raise _bad("quant_method", self.quant_method, repr(QUANT_METHOD))


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(MetaAugConfig)

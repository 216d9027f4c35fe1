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
    * ``modules_to_not_convert`` -- module names (exact, or a dotted prefix / suffix) kept in float.
      Unlike transformers' built-in quantizers no default skips (such as the output head) are
      added, so quantization and loading always convert the same modules.
    """

    method: str = "metaaug"
    weight_bits: int = 4
    activation_bits: int | None = 4
    first_last_8bit: bool = True
    modules_to_not_convert: list[str] | None = None
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
        names = self.modules_to_not_convert
        if names is not None:
            if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
                raise _bad("modules_to_not_convert", names, "None or a list of module names")
            self.modules_to_not_convert = list(names)
        if self.quant_method != QUANT_METHOD:
            raise _bad("quant_method", self.quant_method, repr(QUANT_METHOD))


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(MetaAugConfig)

"""Post-training quantization building blocks (fake quantizers for BRECQ / QDrop / MetaAug)."""

from hf_extensions.quantization.config import QUANT_METHOD, MetaAugConfig
from hf_extensions.quantization.hf_quantizer import MetaAugHfQuantizer
from hf_extensions.quantization.modules import (
    QuantConv2d,
    QuantLinear,
    quantize_model_rtn,
    replace_with_quant_modules,
)
from hf_extensions.quantization.quantizers import (
    ActivationQuantizer,
    WeightQuantizer,
    fake_quantize,
    grad_scale,
    lp_error,
    minmax_scale_zero_point,
    round_ste,
    search_scale_zero_point,
)

__all__ = [
    "QUANT_METHOD",
    "ActivationQuantizer",
    "MetaAugConfig",
    "MetaAugHfQuantizer",
    "QuantConv2d",
    "QuantLinear",
    "WeightQuantizer",
    "fake_quantize",
    "grad_scale",
    "lp_error",
    "minmax_scale_zero_point",
    "quantize_model_rtn",
    "replace_with_quant_modules",
    "round_ste",
    "search_scale_zero_point",
]

"""Post-training quantization building blocks (fake quantizers for BRECQ / QDrop / MetaAug)."""

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
    "ActivationQuantizer",
    "WeightQuantizer",
    "fake_quantize",
    "grad_scale",
    "lp_error",
    "minmax_scale_zero_point",
    "round_ste",
    "search_scale_zero_point",
]

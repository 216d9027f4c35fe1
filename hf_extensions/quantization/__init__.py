"""Post-training quantization: BRECQ / QDrop block reconstruction and MetaAug (optimum plug-in).

Importing this package registers :class:`MetaAugConfig` and :class:`MetaAugHfQuantizer` with
``transformers`` (``import hf_extensions`` does it too), so that ``AutoModel...from_pretrained``
rebuilds a saved quantized model. Only the registration is imported eagerly; the reconstruction,
MetaAug, export and Optimum modules load on first use of one of their names (they pull in
``optimum`` and ``accelerate``).
"""

from __future__ import annotations

import importlib
from typing import Any

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
    clamp_ste,
    fake_quantize,
    grad_scale,
    lp_error,
    minmax_scale_zero_point,
    round_ste,
    search_scale_zero_point,
)

#: name -> submodule, imported when the name is first used.
_LAZY = {
    "export_integer": "export",
    "load_integer_export": "export",
    "export_onnx": "onnx_export",
    "load_onnx": "onnx_export",
    "TransformNet": "metaaug",
    "meta_losses": "metaaug",
    "pkt_loss": "metaaug",
    "train_transform": "metaaug",
    "MetaAugQuantizer": "optimum_quantizer",
    "calibration_images": "optimum_quantizer",
    "load_quantized": "optimum_quantizer",
    "ReconstructionResult": "calibration",
    "block_output_error": "reconstruction",
    "find_blocks": "reconstruction",
    "reconstruct_block": "reconstruction",
    "reconstruct_model": "calibration",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "QUANT_METHOD",
    "ActivationQuantizer",
    "MetaAugConfig",
    "MetaAugHfQuantizer",
    "MetaAugQuantizer",
    "QuantConv2d",
    "QuantLinear",
    "ReconstructionResult",
    "TransformNet",
    "WeightQuantizer",
    "block_output_error",
    "calibration_images",
    "clamp_ste",
    "export_integer",
    "export_onnx",
    "fake_quantize",
    "find_blocks",
    "grad_scale",
    "load_integer_export",
    "load_onnx",
    "load_quantized",
    "lp_error",
    "meta_losses",
    "minmax_scale_zero_point",
    "pkt_loss",
    "quantize_model_rtn",
    "reconstruct_block",
    "reconstruct_model",
    "replace_with_quant_modules",
    "round_ste",
    "search_scale_zero_point",
    "train_transform",
]

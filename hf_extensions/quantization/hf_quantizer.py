"""``MetaAugHfQuantizer``: lets ``AutoModel*.from_pretrained`` rebuild a saved quantized model.

Registered with ``transformers.quantizers.auto.register_quantizer`` under the same name as
:class:`~hf_extensions.quantization.config.MetaAugConfig`. transformers builds the float skeleton,
calls :meth:`_process_model_before_weight_loading` (which swaps in
:class:`~hf_extensions.quantization.modules.QuantLinear` / ``QuantConv2d``, so that the
``weight_scale`` / ``weight_zero_point`` / ``act_scale`` / ``act_zero_point`` buffers exist), then
loads every tensor of the safetensors checkpoint into it unchanged: the load is bit-exact.

Only pre-quantized checkpoints load (``requires_calibration = True``): quantizing on the fly
needs calibration data, which ``from_pretrained`` does not have.
"""

from __future__ import annotations

from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantizer
from transformers.quantizers.base import HfQuantizer

from hf_extensions.quantization.config import QUANT_METHOD, MetaAugConfig
from hf_extensions.quantization.modules import replace_with_quant_modules
from hf_extensions.validation import refuse

__all__ = ["MetaAugHfQuantizer"]


class MetaAugHfQuantizer(HfQuantizer):
    """transformers hooks for :class:`MetaAugConfig` checkpoints (fake-quant inference form)."""

    requires_calibration = True
    quantization_config: MetaAugConfig

    def validate_environment(self, *args, **kwargs) -> None:
        """Reject ``device_map`` offloading to CPU/disk mixes: the modules need all buffers."""
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            refuse("device_map", f"free of disk offload for {QUANT_METHOD}", device_map)

    def _process_model_before_weight_loading(self, model, **kwargs):
        # Exactly the conversion quantize_model_rtn made: no default skips, so the same modules
        # (and hence the same checkpoint keys) are quantized.
        return replace_with_quant_modules(model, self.quantization_config)

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(MetaAugHfQuantizer)

"""Integer export of a fake-quantized model: integer weight tensors + scales in safetensors.

What it is: for every :class:`QuantLinear` / :class:`QuantConv2d`, the weight as the unsigned
integers ``q = clip(round(W / s) + z, 0, 2^b - 1)`` (``uint8``; two 4-bit-or-fewer values packed
per byte), its per-output-channel ``weight_scale`` (float32) and ``weight_zero_point`` (int32),
and the per-tensor input ``act_scale`` / ``act_zero_point``; every other tensor (biases, norms,
embeddings, float layers) as it is. :func:`load_integer_export` rebuilds the fake-quant model
bit-exactly, since ``W = s (q - z)`` is exactly what the fake-quant model stores.

What it does and does not speed up: the file is about ``b / 32`` of the float size for the
quantized weights (W4: about 8x smaller), so it downloads and loads faster and holds the exact
integers an integer runtime (an int8 GEMM/conv kernel, a microcontroller) needs. It does NOT make
inference faster in PyTorch: loading dequantizes the weights back to float and the activation
quantization stays simulated, because PyTorch has no general per-channel asymmetric int4/int2
GEMM/conv with per-tensor asymmetric int4 inputs. Real speed needs such a kernel; this export
is the input for one, not the kernel.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from hf_extensions.atomic import atomic_save, recover_interrupted_save
from hf_extensions.loading import FIX, check_tensors, read_safetensors_metadata, read_tensors
from hf_extensions.quantization.config import MetaAugConfig
from hf_extensions.quantization.modules import replace_with_quant_modules
from hf_extensions.quantization.reconstruction import quant_layers
from hf_extensions.validation import refuse

__all__ = ["EXPORT_FORMAT", "export_integer", "load_integer_export", "pack_bits", "unpack_bits"]

EXPORT_FORMAT = "hf_extensions_int_v1"
FILE_NAME = "model_int.safetensors"


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integers of ``bits <= 4`` two per byte (low nibble first); else ``uint8``."""
    flat = q.to(torch.uint8).flatten()
    if bits > 4:
        return flat
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_bits(packed: torch.Tensor, bits: int, shape: torch.Size | list[int]) -> torch.Tensor:
    """Inverse of :func:`pack_bits` for a tensor of ``shape``."""
    numel = 1
    for size in shape:
        numel *= size
    if bits > 4:
        return packed[:numel].reshape(shape)
    out = torch.stack([packed & 0xF, packed >> 4], dim=1).flatten()
    return out[:numel].reshape(shape)


@torch.no_grad()
def export_integer(
    model: nn.Module, directory: str | Path, config: MetaAugConfig | None = None
) -> Path:
    """Write ``model_int.safetensors`` (integers + scales) to ``directory``; returns its path.

    Reload it with :func:`load_integer_export` (the file format is in the module docstring).

    Args:
        model (`nn.Module`):
            A quantized model (its layers :class:`QuantLinear` / :class:`QuantConv2d` with
            calibrated scales), e.g. returned by ``MetaAugQuantizer.quantize``.
        directory (`str` or `pathlib.Path`):
            Where to write the file; created if missing.
        config (`MetaAugConfig`, *optional*, defaults to `None`):
            The config the model was quantized with, stored in the file's metadata; `None`
            reads ``model.config.quantization_config`` (a ``transformers`` model).

    Returns:
        `pathlib.Path`: the path of ``model_int.safetensors``.

    Raises:
        ValueError: no ``MetaAugConfig`` is given or found on the model.
    """
    directory = Path(directory)
    if config is None:
        config = getattr(getattr(model, "config", None), "quantization_config", None)
    if not isinstance(config, MetaAugConfig):
        refuse("config", "the MetaAugConfig the model was quantized with", config)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    quantized_weights = set()
    for name, layer in quant_layers(model):
        bits = layer.weight_bits
        shape = [-1] + [1] * (layer.weight.dim() - 1)
        s = layer.weight_scale.reshape(shape)
        z = layer.weight_zero_point.reshape(shape)
        q = torch.clamp(torch.round(layer.weight / s) + z, 0, 2**bits - 1)
        tensors[f"{name}.weight_int"] = pack_bits(q, bits).contiguous()
        tensors[f"{name}.weight_scale"] = layer.weight_scale.float().contiguous()
        tensors[f"{name}.weight_zero_point"] = layer.weight_zero_point.to(torch.int32)
        if layer.activation_bits is not None:
            tensors[f"{name}.act_scale"] = layer.act_scale.float().reshape(())
            tensors[f"{name}.act_zero_point"] = layer.act_zero_point.to(torch.int32).reshape(())
        layers[name] = {
            "weight_bits": bits,
            "activation_bits": layer.activation_bits,
            "shape": list(layer.weight.shape),
        }
        quantized_weights.add(f"{name}.weight")
    for key, value in model.state_dict().items():
        if key not in quantized_weights and key not in tensors:
            tensors[key] = value.contiguous()
    metadata = {
        "format": EXPORT_FORMAT,
        "quantization_config": json.dumps(config.to_dict()),
        "layers": json.dumps(layers),
    }
    with atomic_save(directory) as stage:
        save_file(tensors, str(stage / FILE_NAME), metadata=metadata)
    return directory / FILE_NAME


@torch.no_grad()
def load_integer_export(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load an :func:`export_integer` file into ``model`` (the float architecture), in place.

    Refuses a file of another format. The quantized layers are rebuilt with
    :func:`replace_with_quant_modules` from the stored config and their weights dequantized,
    ``W = s (q - z)``. An interrupted export is first finished or discarded, and the file's
    tensors are checked against the model's (names and shapes) with messages naming the file.
    """
    directory = Path(directory)
    recover_interrupted_save(directory)
    path = directory / FILE_NAME
    metadata = read_safetensors_metadata(path)
    if metadata.get("format") != EXPORT_FORMAT:
        raise ValueError(
            f"{path}: format={metadata.get('format')!r} is invalid; allowed: {EXPORT_FORMAT!r} "
            "(write it with export_integer)"
        )
    try:
        config = MetaAugConfig.from_dict(json.loads(metadata["quantization_config"]))
        layers = json.loads(metadata["layers"])
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path}: unreadable metadata ({error!r}): {FIX}.") from error
    tensors = read_tensors(path)
    replace_with_quant_modules(model, config)
    quantized = dict(quant_layers(model))
    if set(quantized) != set(layers):
        raise ValueError(
            f"{path}: layers={sorted(set(layers) ^ set(quantized))} differ between the export and "
            "the model; allowed: the same architecture"
        )
    dequantized = {f"{name}.weight" for name in layers}
    expected = {k: v for k, v in model.state_dict().items() if k not in dequantized}
    for name, layer in quantized.items():
        if list(layers[name]["shape"]) != list(layer.weight.shape):
            raise ValueError(
                f"{path}: layer {name!r} was exported with weight shape {layers[name]['shape']}, "
                f"the model's is {list(layer.weight.shape)}: {FIX}."
            )
        numel, bits = layer.weight.numel(), layers[name]["weight_bits"]
        expected[f"{name}.weight_int"] = (numel if bits > 4 else (numel + 1) // 2,)
    check_tensors(path, tensors, expected)
    state = {}
    for name, info in layers.items():
        shape = info["shape"]
        q = unpack_bits(tensors.pop(f"{name}.weight_int"), info["weight_bits"], shape).float()
        view = [-1] + [1] * (len(shape) - 1)
        s = tensors[f"{name}.weight_scale"]
        z = tensors[f"{name}.weight_zero_point"].float()
        state[f"{name}.weight"] = (q - z.reshape(view)) * s.reshape(view)
        state[f"{name}.weight_zero_point"] = z
        tensors.pop(f"{name}.weight_zero_point")
        if f"{name}.act_zero_point" in tensors:
            state[f"{name}.act_zero_point"] = tensors.pop(f"{name}.act_zero_point").float()
    state.update(tensors)
    model.load_state_dict(state, strict=True)
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = config
    return model

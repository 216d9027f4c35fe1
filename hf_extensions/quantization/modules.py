"""Inference form of a post-training-quantized model: layers holding their calibrated scales.

:class:`QuantLinear` and :class:`QuantConv2d` keep the float weight and, as buffers saved in the
checkpoint, the per-output-channel ``weight_scale`` / ``weight_zero_point`` and (unless weight-only)
the per-tensor ``act_scale`` / ``act_zero_point`` of the layer input. ``forward`` fake-quantizes
both with :func:`~hf_extensions.quantization.quantizers.fake_quantize`,
``x_hat = s * (clip(round(x / s) + z, 0, 2^b - 1) - z)`` (BRECQ Eq. 1), i.e. what BRECQ / QDrop /
MetaAug (Pham et al., ECCV 2024, arXiv 2407.14726) evaluate after calibration. A weight learned by
AdaRound is stored already rounded (``s * (q - z)``), so re-quantizing it is the identity.

:func:`quantize_model_rtn` is the round-to-nearest baseline: weight ranges by the Lp grid search of
:func:`~hf_extensions.quantization.quantizers.search_scale_zero_point` (p = 2.4, the BRECQ / QDrop
``scale_method='mse'``), activation ranges by the same search over the float model's layer inputs
on one calibration batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from hf_extensions.quantization.config import MetaAugConfig
from hf_extensions.quantization.quantizers import fake_quantize, search_scale_zero_point
from hf_extensions.validation import refuse

__all__ = [
    "UNSUPPORTED_LAYERS",
    "QuantConv2d",
    "QuantLinear",
    "check_quantizable",
    "quantizable_module_names",
    "quantize_model_rtn",
    "replace_with_quant_modules",
]


class _QuantMixin:
    """Buffers and fake quantization shared by :class:`QuantLinear` and :class:`QuantConv2d`."""

    weight: nn.Parameter

    def _init_quant(self, weight_bits: int, activation_bits: int | None) -> None:
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits
        out_channels = self.weight.shape[0]
        device = self.weight.device
        self.register_buffer("weight_scale", torch.ones(out_channels, device=device))
        self.register_buffer("weight_zero_point", torch.zeros(out_channels, device=device))
        if activation_bits is not None:
            self.register_buffer("act_scale", torch.ones((), device=device))
            self.register_buffer("act_zero_point", torch.zeros((), device=device))

    #: ``False`` runs the layer in full precision (later blocks during reconstruction, as in the
    #: BRECQ / MetaAug code). A plain attribute: it is not saved.
    quant_enabled: bool = True

    def quantized_weight(self) -> torch.Tensor:
        if not self.quant_enabled:
            return self.weight
        learner = self._modules.get("weight_quantizer")
        if learner is not None:  # AdaRound during reconstruction
            return learner(self.weight)
        qmax = 2**self.weight_bits - 1
        return fake_quantize(self.weight, self.weight_scale, self.weight_zero_point, 0, qmax, 0)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_bits is None or not self.quant_enabled:
            return x
        learner = self._modules.get("input_quantizer")
        if learner is not None:  # LSQ step + QDrop during reconstruction
            return learner(x)
        qmax = 2**self.activation_bits - 1
        return fake_quantize(x, self.act_scale, self.act_zero_point, 0, qmax)

    def quant_repr(self) -> str:
        return f"weight_bits={self.weight_bits}, activation_bits={self.activation_bits}"


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` whose weight and input are fake-quantized with stored scales."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_bits: int = 4,
        activation_bits: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quant(weight_bits, activation_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quant_repr()}"


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight (per output channel) and input are fake-quantized."""

    def __init__(
        self,
        *args,
        weight_bits: int = 4,
        activation_bits: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_quant(weight_bits, activation_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quant_repr()}"


def _skipped(name: str, skip: list[str]) -> bool:
    return any(
        name == s or name.startswith(s + ".") or name.endswith("." + s) or f".{s}." in name
        for s in skip
    )


def quantizable_module_names(model: nn.Module, config: MetaAugConfig) -> list[str]:
    """Names of the ``nn.Linear`` / ``nn.Conv2d`` modules that ``config`` converts, in order."""
    skip = config.modules_to_not_convert or []
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name and not _skipped(name, skip)
    ]


#: Weight-bearing layers this quantizer has no quantized form of (their weights would stay in
#: float while the model is reported as quantized). ``nn.MultiheadAttention`` is here because it
#: reads ``out_proj.weight`` directly, bypassing a replaced ``out_proj``.
UNSUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Bilinear,
    nn.RNNBase,
    nn.MultiheadAttention,
)
#: What the quantizer supports, for error messages.
SUPPORTED_MODELS = (
    "image models (a transformers model whose main input is pixel_values, or an nn.Module "
    "called on an image batch [N, C, H, W]) made of nn.Linear / nn.Conv2d layers, such as "
    "ResNet, MobileNetV2 and ViT classifiers"
)


def _unsupported_layers() -> tuple[type[nn.Module], ...]:
    try:  # GPT-2-style transposed linear layers of transformers
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers moved it
        return UNSUPPORTED_LAYERS
    return (*UNSUPPORTED_LAYERS, Conv1D)


def check_quantizable(model: nn.Module, config: MetaAugConfig) -> None:
    """Refuse, before calibrating, a model this quantizer would fail on or quantize only partly.

    Raises:
        ValueError: a ``transformers`` model whose main input is not ``pixel_values`` (a text
            or audio model); a layer of a type without a quantized form (:data:`UNSUPPORTED_LAYERS`
            and transformers' ``Conv1D``) that ``config.modules_to_not_convert`` does not name;
            or no ``nn.Linear`` / ``nn.Conv2d`` layer to quantize.
    """
    from transformers import PreTrainedModel

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    described = f"{type(model).__name__}" + (f" (model_type {model_type!r})" if model_type else "")
    main_input = getattr(model, "main_input_name", "pixel_values")
    if isinstance(model, PreTrainedModel) and main_input != "pixel_values":
        raise ValueError(
            f"MetaAug quantization does not support {described}: its main input is "
            f"{main_input!r}, and calibration feeds images (pixel_values). Supported: "
            f"{SUPPORTED_MODELS}."
        )
    skip = config.modules_to_not_convert or []
    unsupported = {
        name: type(module).__name__
        for name, module in model.named_modules()
        if name and isinstance(module, _unsupported_layers()) and not _skipped(name, skip)
    }
    # Layers inside an unsupported one are reported through it.
    unsupported = {
        name: kind
        for name, kind in unsupported.items()
        if not any(name.startswith(other + ".") for other in unsupported)
    }
    if unsupported:
        raise ValueError(
            f"MetaAug quantization cannot quantize these layers of {described}: {unsupported} "
            "(it has quantized forms of nn.Linear and nn.Conv2d only). Fix: keep them in float "
            f"with MetaAugConfig(modules_to_not_convert={sorted(unsupported)}), or use a model "
            f"without them. Supported: {SUPPORTED_MODELS}."
        )
    if not quantizable_module_names(model, config):
        raise ValueError(
            f"MetaAug quantization found no nn.Linear / nn.Conv2d layer to quantize in "
            f"{described} (after modules_to_not_convert={skip}). Supported: {SUPPORTED_MODELS}."
        )


def _bits_for(names: list[str], config: MetaAugConfig) -> dict[str, tuple[int, int | None]]:
    bits = {name: (config.weight_bits, config.activation_bits) for name in names}
    if config.first_last_8bit and names:
        act8 = None if config.activation_bits is None else 8
        bits[names[0]] = (8, act8 if config.quantize_first_layer_input else None)
        bits[names[-1]] = (8, act8)
    return bits


def _quant_copy(module: nn.Module, weight_bits: int, activation_bits: int | None) -> nn.Module:
    w = module.weight
    factory = {"device": w.device, "dtype": w.dtype}
    if isinstance(module, nn.Linear):
        new = QuantLinear(
            module.in_features,
            module.out_features,
            module.bias is not None,
            weight_bits,
            activation_bits,
            **factory,
        )
    else:
        new = QuantConv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            weight_bits=weight_bits,
            activation_bits=activation_bits,
            **factory,
        )
    if w.device.type != "meta":
        with torch.no_grad():
            new.weight.copy_(w)
            if module.bias is not None:
                new.bias.copy_(module.bias)
    new.train(module.training)
    return new


def replace_with_quant_modules(model: nn.Module, config: MetaAugConfig) -> nn.Module:
    """Swap every convertible ``nn.Linear`` / ``nn.Conv2d`` for its quantized form, in place.

    Weights and biases are copied (skipped on the meta device, where transformers builds the
    skeleton before loading); scales start at 1 and zero points at 0 until calibrated or loaded.
    Modules already quantized are left alone. Returns ``model``.
    """
    names = [
        n
        for n in quantizable_module_names(model, config)
        if not isinstance(model.get_submodule(n), _QuantMixin)
    ]
    for name, (w_bits, a_bits) in _bits_for(names, config).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quant_copy(getattr(parent, child), w_bits, a_bits))
    return model


def _run(model: nn.Module, inputs: torch.Tensor | Mapping) -> None:
    if isinstance(inputs, Mapping):
        model(**inputs)
    else:
        model(inputs)


@torch.no_grad()
def quantize_model_rtn(
    model: nn.Module,
    config: MetaAugConfig,
    calibration_inputs: torch.Tensor | Mapping | None = None,
) -> nn.Module:
    """Round-to-nearest PTQ of ``model`` in place; sets ``model.config.quantization_config``.

    Weight scales: per-output-channel Lp grid search (p = 2.4). Activation scales: per-tensor Lp
    grid search over each layer's input recorded from the float model on one batch (all layers
    calibrated from float inputs, not sequentially).

    Args:
        model (`nn.Module`):
            The float model; its convertible ``nn.Linear`` / ``nn.Conv2d`` layers are replaced
            in place by :class:`QuantLinear` / :class:`QuantConv2d` (see
            :func:`replace_with_quant_modules`).
        config (`MetaAugConfig`):
            The bit widths and the modules to convert (``weight_bits``, ``activation_bits``,
            ``first_last_8bit``, ``quantize_first_layer_input``, ``modules_to_not_convert``);
            the calibration settings are not used.
        calibration_inputs (`torch.Tensor` or `Mapping`, *optional*, defaults to `None`):
            One batch to record the layer inputs on, run through the float model once: a
            tensor (passed positionally) or a dict of keyword arguments of the model. Required
            when ``config.activation_bits`` is set; not used for weight-only quantization.

    Returns:
        `nn.Module`: ``model``, quantized.

    Raises:
        ValueError: ``calibration_inputs`` is `None` while ``config.activation_bits`` is set.
        RuntimeError: a quantized layer is not called on ``calibration_inputs``.
    """
    if config.activation_bits is not None and calibration_inputs is None:
        refuse(
            "calibration_inputs",
            "a tensor or a dict of model inputs when activation_bits is set (or "
            "activation_bits=None for weight-only quantization)",
            None,
        )
    names = quantizable_module_names(model, config)
    bits = _bits_for(names, config)
    recorded: dict[str, torch.Tensor] = {}
    if config.activation_bits is not None:
        hooks = []
        for name in names:

            def hook(_module, args, _name=name):
                recorded[_name] = args[0].detach()

            hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
        was_training = model.training
        model.eval()
        try:
            _run(model, calibration_inputs)
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
    replace_with_quant_modules(model, config)
    for name in names:
        module = model.get_submodule(name)
        w_bits, a_bits = bits[name]
        scale, zp = search_scale_zero_point(module.weight, 0, 2**w_bits - 1, axis=0)
        module.weight_scale.copy_(scale)
        module.weight_zero_point.copy_(zp)
        if a_bits is not None:
            if name not in recorded:
                raise RuntimeError(f"{name} was not called on the calibration inputs")
            scale, zp = search_scale_zero_point(recorded[name], 0, 2**a_bits - 1, axis=None)
            module.act_scale.copy_(scale)
            module.act_zero_point.copy_(zp)
    if getattr(model, "config", None) is not None:
        model.config.quantization_config = config
    return model

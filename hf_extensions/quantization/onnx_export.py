"""ONNX export of a fake-quantized model that ONNX Runtime executes with integer kernels.

:func:`export_onnx` writes the model as an ONNX graph in the QDQ format: every
:class:`~hf_extensions.quantization.modules.QuantConv2d` / ``QuantLinear`` becomes

* its input: ``QuantizeLinear`` (uint8) ``-> DequantizeLinear`` with the layer's own per-tensor
  ``act_scale`` / ``act_zero_point``;
* its weight: an 8-bit integer initializer ``q`` and ``DequantizeLinear(q, weight_scale, zero
  point, axis=0)`` (per output channel), so the file holds the weights as integers;
* its bias: float, as in the model;

and a ``BatchNormalization`` that follows a quantized convolution is folded into that
convolution's per-channel scale and bias (``s' = s |γ / sqrt(σ² + ε)|``, the integers unchanged,
or mirrored where ``γ < 0``). ONNX Runtime's graph optimiser rounds such a bias to int32 on the
grid ``act_scale * weight_scale`` and fuses ``DQ -> Conv -> (Relu ->) Q`` into ``QLinearConv``:
uint8 x int8 (or uint8) kernels with int32 accumulation. A quantized layer whose output the
fake-quant model keeps in float (a convolution feeding a float residual sum, the classifier)
has no quantizer after it and runs in float on its dequantized weight, exactly as the fake-quant
model computes it; :class:`OnnxRunner` dequantizes those weights once at load (ONNX Runtime
would redo it every call). :func:`integer_op_counts` reports what ONNX Runtime fused.

Bit widths below 8 (MetaAug / BRECQ / QDrop at W4, W2, A4, ...) are stored in 8-bit containers
holding the same integers: a b-bit weight ``q`` in ``[0, 2^b - 1]`` with zero point ``z`` is
stored as the signed ``q - z`` with zero point 0 (int8; it fits for b <= 7, and for b = 8 where
every ``q - z`` lies in [-127, 127]; otherwise uint8 ``q`` with the per-channel zero points, which
ONNX Runtime runs on a slower u8u8 path), and a b-bit input is quantized to uint8 and then
clipped in integers to ``[0, 2^b - 1]`` (a uint8 ``Clip`` between ``QuantizeLinear`` and
``DequantizeLinear``), which gives the fake-quant model's integers and keeps the fusions.

Equivalence with the fake-quant model (BRECQ Eq. 1, ``x_hat = s (clip(round(x / s) + z, 0,
2^b - 1) - z)``; Pham et al., "MetaAug", ECCV 2024, arXiv 2407.14726): the graph as written
(ONNX Runtime with its optimisations off) computes it up to float rounding (the folded batch norm
changes the order of float operations; rarely a ``round`` tie flips by one step). With the
optimisations on, the int32 bias rounding (at most ``act_scale * weight_scale / 2`` per output
channel) moves some values across a rounding boundary of the next quantizer; the tests hold the
logits to a mean absolute difference of :data:`LOGIT_TOLERANCE` of their standard deviation and
top-1 agreement of 95% (tiny model), and ``benchmarks/quantization_runtime.py`` measures the
accuracy difference on ``zoo/resnet20`` against a tolerance of 0.5 percentage points.

Why not Optimum: its ONNX exporter now lives in the ``optimum-onnx`` package, which requires
``transformers<4.58`` and ``optimum~=2.1`` (this project runs transformers 5 and optimum 2.3), and
ONNX Runtime's own quantizer would re-calibrate the scales. So the graph is written here with
``torch.onnx.export`` (its TorchScript exporter, ``dynamo=False``) and the ``onnx`` helpers, from
the model's own integers and scales.
"""

from __future__ import annotations

import collections
import copy
import io
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from hf_extensions.atomic import atomic_write_bytes
from hf_extensions.quantization.modules import QuantConv2d, QuantLinear, _QuantMixin
from hf_extensions.validation import refuse

__all__ = [
    "INTEGER_OPS",
    "LOGIT_TOLERANCE",
    "OnnxRunner",
    "export_float_onnx",
    "export_onnx",
    "integer_op_counts",
    "load_onnx",
]

#: ONNX Runtime operators that compute on integers (after its QDQ fusions).
INTEGER_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "QGemm",
        "QLinearAdd",
        "QLinearGlobalAveragePool",
        "QLinearAveragePool",
    }
)
#: The export's tolerance on logits: ``max |onnx - fake_quant| <= LOGIT_TOLERANCE * std(fake)``.
LOGIT_TOLERANCE = 0.02
OPSET = 17
SUPPORTED = "QuantConv2d and QuantLinear (nn.Conv2d / nn.Linear quantized by this package)"


def _onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as error:  # pragma: no cover - the extra is installed by make install
        raise ImportError(
            "the ONNX export needs onnx and onnxruntime: pip install 'hf-extensions[onnx]'"
        ) from error
    return onnx, onnxruntime


class _QuantizeDequantize(torch.autograd.Function):
    """``s (min(Q(x), q_max) - z)``: exported as ONNX ``QuantizeLinear`` (uint8), a uint8 ``Clip``
    to ``[0, q_max]`` when ``q_max < 255`` (a b-bit grid in the 8-bit container), and
    ``DequantizeLinear``."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmax):
        z = zero_point.to(x.dtype)
        return (torch.clamp(torch.round(x / scale) + z, 0, qmax) - z) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, qmax):
        q = g.op("QuantizeLinear", x, scale, zero_point)
        if qmax < 255:
            low = g.op("Constant", value_t=torch.tensor(0, dtype=torch.uint8))
            high = g.op("Constant", value_t=torch.tensor(qmax, dtype=torch.uint8))
            q = g.op("Clip", q, low, high)
        return g.op("DequantizeLinear", q, scale, zero_point)


class _DequantizeWeight(torch.autograd.Function):
    """``s (q - z)`` per output channel: exported as ``DequantizeLinear(q, s, z, axis=0)``."""

    @staticmethod
    def forward(ctx, q, scale, zero_point):
        shape = [-1] + [1] * (q.dim() - 1)
        return (q.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, q, scale, zero_point):
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=0)


def _weight_integers(name: str, layer: _QuantMixin) -> tuple[torch.Tensor, ...]:
    """The layer's weight integers in an 8-bit container, its scale and zero point (see module
    docstring): int8 ``q - z`` with zero point 0 where it fits [-127, 127], else uint8 ``q``."""
    bits = layer.weight_bits
    qmax = 2**bits - 1
    z = layer.weight_zero_point.detach().float()
    if not torch.equal(z, z.round()) or z.min() < 0 or z.max() > qmax:
        refuse(f"{name}.weight_zero_point", f"integers in [0, {qmax}]", z.tolist())
    shape = [-1] + [1] * (layer.weight.dim() - 1)
    s = layer.weight_scale.detach().float().reshape(shape)
    # The same integers as fake_quantize(W, s, z, 0, qmax): clip(round(W / s) + z).
    q = torch.clamp(torch.round(layer.weight.detach().float() / s) + z.reshape(shape), 0, qmax)
    centred = q - z.reshape(shape)
    scale = layer.weight_scale.detach().float().clone()
    if centred.abs().max() <= 127:
        return centred.to(torch.int8), scale, torch.zeros_like(z, dtype=torch.int8)
    return q.to(torch.uint8), scale, z.to(torch.uint8)


class _ExportedLayer(nn.Module):
    """A quantized layer rewritten with the two ONNX-exportable functions above."""

    def __init__(self, name: str, layer: _QuantMixin) -> None:
        super().__init__()
        self.is_conv = isinstance(layer, QuantConv2d)
        if self.is_conv:
            self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups)
            if layer.padding_mode != "zeros":
                refuse(f"{name}.padding_mode", "'zeros' for the ONNX export", layer.padding_mode)
        q, scale, zero_point = _weight_integers(name, layer)
        self.register_buffer("weight_int", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float())
        self.activation_bits = layer.activation_bits
        if layer.activation_bits is not None:
            s = layer.act_scale.detach().float().reshape(())
            z = layer.act_zero_point.detach().float().reshape(())
            qmax = 2**layer.activation_bits - 1
            if not torch.equal(z, z.round()) or not 0 <= z.item() <= qmax:  # host: check
                refuse(f"{name}.act_zero_point", f"an integer in [0, {qmax}]", z.item())
            self.register_buffer("act_scale", s.clone())
            self.register_buffer("act_zero_point", z.to(torch.uint8))
            self.act_qmax = qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_bits is not None:
            x = _QuantizeDequantize.apply(x, self.act_scale, self.act_zero_point, self.act_qmax)
        w = _DequantizeWeight.apply(self.weight_int, self.weight_scale, self.weight_zero_point)
        if self.is_conv:
            return F.conv2d(x, w, self.bias, *self.conv_args)
        return F.linear(x, w, self.bias)


class _Logits(nn.Module):
    """The model called on one tensor, returning its logits (a ``ModelOutput``'s ``logits``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, Mapping) and "logits" in out:
            return out["logits"]
        if isinstance(out, tuple):
            return out[0]
        raise TypeError(f"the model returned {type(out).__name__}; the export needs a tensor")


def _exportable_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every quantized layer replaced by _ExportedLayer."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantMixin)]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no quantized layer to export: quantize it first "
            f"(quantize_model_rtn or MetaAugQuantizer.quantize). Supported layers: {SUPPORTED}."
        )
    for name, module in found:
        if not isinstance(module, (QuantConv2d, QuantLinear)):
            raise ValueError(
                f"layer {name!r} is a {type(module).__name__}, which the ONNX export does not "
                f"support; supported: {SUPPORTED}."
            )
        if "weight_quantizer" in module._modules or "input_quantizer" in module._modules:
            raise ValueError(
                f"layer {name!r} is still being calibrated (it holds AdaRound / LSQ learners): "
                "export the model that calibration returns."
            )
        if not module.quant_enabled:
            raise ValueError(
                f"layer {name!r} has quant_enabled=False: export the fake-quant model as it is "
                "evaluated (set_quant_enabled(model, True))."
            )
    copied = copy.deepcopy(model).eval().float()
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = copied.get_submodule(parent_name) if parent_name else copied
        setattr(parent, child, _ExportedLayer(name, module))
    return copied


def _check_inputs(example_inputs: Any) -> torch.Tensor:
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 2:
        refuse(
            "example_inputs",
            "one batched tensor (e.g. pixel_values [N, C, H, W]) that the model is called on",
            type(example_inputs).__name__,
        )
    return example_inputs.detach().float().cpu()


def _to_bytes(module: nn.Module, example: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.onnx.export(
        _Logits(module),
        (example,),
        buffer,
        dynamo=False,  # the TorchScript exporter: our QDQ functions carry ONNX symbolics
        opset_version=OPSET,
        input_names=["pixel_values"],
        output_names=["logits"],
        dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=True,
    )
    return buffer.getvalue()


# ----------------------------------------------------------------------------- graph rewrites


class _Graph:
    """Producers, consumers and initializers of an ONNX graph, for the rewrites below."""

    def __init__(self, model) -> None:
        from onnx import numpy_helper

        self.model = model
        self.graph = model.graph
        self.numpy_helper = numpy_helper
        self.init = {t.name: t for t in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers = collections.defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.counter = 0

    def array(self, name: str) -> np.ndarray | None:
        if name in self.init:
            return self.numpy_helper.to_array(self.init[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Identity":  # the exporter's shared constants
            return self.array(node.input[0])
        if node is not None and node.op_type == "Constant":
            return self.numpy_helper.to_array(node.attribute[0].t)
        return None

    def add(self, array: np.ndarray, stem: str) -> str:
        self.counter += 1
        name = f"{stem}_hfx{self.counter}"
        self.graph.initializer.append(self.numpy_helper.from_array(array, name))
        self.init[name] = self.graph.initializer[-1]
        return name

    def dequantized(self, name: str) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray] | None:
        """``(node, q, scale, zero_point)`` when ``name`` is a DequantizeLinear of constants."""
        node = self.producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
            return None
        arrays = [self.array(i) for i in node.input[:3]]
        return None if any(a is None for a in arrays) else (node, *arrays)


def _fold_batch_norms(g: _Graph) -> int:
    """Fold each BatchNormalization fed only by a Conv on a dequantized weight into it."""
    folded = 0
    for bn in [n for n in g.graph.node if n.op_type == "BatchNormalization"]:
        conv = g.producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(g.consumers[conv.output[0]]) != 1:
            continue
        weight = g.dequantized(conv.input[1])
        params = [g.array(i) for i in bn.input[1:5]]
        if weight is None or any(p is None for p in params):
            continue
        dq, q, scale, zero_point = weight
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        factor = gamma / np.sqrt(var + eps)
        bias = g.array(conv.input[2]) if len(conv.input) > 2 else np.zeros_like(factor)
        negative = (factor < 0).reshape([-1] + [1] * (q.ndim - 1))
        if q.dtype == np.int8:  # centred integers: mirror by negation (|q| <= 127)
            q = np.where(negative, -q, q).astype(np.int8)
        else:  # uint8 with zero points: mirror around 255
            q = np.where(negative, 255 - q, q).astype(np.uint8)
            zero_point = np.where(factor < 0, 255 - zero_point, zero_point).astype(np.uint8)
        dq.input[0] = g.add(q, "weight_int")
        dq.input[1] = g.add((scale * np.abs(factor)).astype(np.float32), "weight_scale")
        dq.input[2] = g.add(zero_point, "weight_zero_point")
        new_bias = ((bias.astype(np.float64) - mean) * factor + beta).astype(np.float32)
        inputs = [conv.input[0], conv.input[1], g.add(new_bias, "bias")]
        del conv.input[:]
        conv.input.extend(inputs)
        conv.output[0] = bn.output[0]
        g.producer[bn.output[0]] = conv
        g.graph.node.remove(bn)
        folded += 1
    return folded


def _drop_unused(model) -> None:
    used = {i for n in model.graph.node for i in n.input}
    for tensor in list(model.graph.initializer):
        if tensor.name not in used:
            model.graph.initializer.remove(tensor)


def _feeds_quantizer(g: _Graph, output: str) -> bool:
    """Whether ``output`` goes only to a QuantizeLinear (directly or through one Relu), the
    pattern ONNX Runtime fuses into an integer kernel."""
    consumers = g.consumers[output]
    if len(consumers) != 1:
        return False
    if consumers[0].op_type == "Relu":
        return _feeds_quantizer(g, consumers[0].output[0])
    return consumers[0].op_type == "QuantizeLinear"


def _dequantize_float_layers(data: bytes) -> tuple[bytes, int]:
    """Replace ``DequantizeLinear(weight)`` by the float weight where the layer cannot be fused.

    ONNX Runtime runs a Conv whose output stays float (no QuantizeLinear after it) in float on
    the dequantized weight, and does not constant-fold that ``DequantizeLinear``: it recomputes
    the weight every call and, since the weight is not constant, skips its blocked (NCHWc)
    convolution. Folding it here, in memory before the session is built, gives the same numbers
    (``(q - z) s`` in float32, as ONNX Runtime computes it) at float speed; the file keeps int8.
    Returns the new bytes and the number of layers folded.
    """
    onnx, _ = _onnx()
    model = onnx.load_from_string(data)
    g = _Graph(model)
    folded = 0
    for node in list(g.graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or _feeds_quantizer(g, node.output[0]):
            continue
        weight = g.dequantized(node.input[1])
        if weight is None or len(g.consumers[node.input[1]]) != 1:
            continue
        dq, q, scale, zero_point = weight
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        if scale.size > 1:
            shape[axis] = -1
        centred = q.astype(np.float32) - zero_point.astype(np.float32).reshape(shape)
        node.input[1] = g.add((centred * scale.astype(np.float32).reshape(shape)), "weight")
        g.graph.node.remove(dq)
        folded += 1
    _drop_unused(model)
    return model.SerializeToString(), folded


def _rewrite(data: bytes) -> bytes:
    onnx, _ = _onnx()
    model = onnx.load_from_string(data)
    g = _Graph(model)
    _fold_batch_norms(g)
    _drop_unused(model)
    onnx.checker.check_model(model)
    return model.SerializeToString()


# ----------------------------------------------------------------------------- public API


@torch.no_grad()
def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: str | Path) -> Path:
    """Write ``model`` (fake-quantized) as an integer QDQ ONNX graph to ``path``; return ``path``.

    The graph's input is ``pixel_values`` (batch size free) and its output ``logits``. The file is
    written atomically (a reader sees the old file or the new one). See the module docstring for
    what is exported and how it relates to the fake-quant model.

    Args:
        model (`nn.Module`):
            A quantized model (its layers :class:`QuantConv2d` / :class:`QuantLinear` with
            calibrated scales), e.g. returned by ``MetaAugQuantizer.quantize`` or
            :func:`quantize_model_rtn`; it is not modified.
        example_inputs (`torch.Tensor`):
            One batch the model is called on (positionally), e.g. ``pixel_values``; used to trace.
        path (`str` or `pathlib.Path`):
            The ``.onnx`` file to write; its folder is created if missing.

    Returns:
        `pathlib.Path`: ``path``.

    Raises:
        ValueError: the model has no quantized layer, a quantized layer of another type than
            :class:`QuantConv2d` / :class:`QuantLinear`, a layer still being calibrated or with
            quantization switched off, a non-integer zero point, or ``example_inputs`` is not
            one tensor.
    """
    _onnx()
    example = _check_inputs(example_inputs)
    data = _rewrite(_to_bytes(_exportable_copy(model), example))
    return atomic_write_bytes(Path(path), data)


@torch.no_grad()
def export_float_onnx(model: nn.Module, example_inputs: torch.Tensor, path: str | Path) -> Path:
    """Write a float model (no quantized layer) the same way, for comparison; return ``path``.

    The TorchScript exporter folds batch norm into the convolutions (eval mode)."""
    _onnx()
    example = _check_inputs(example_inputs)
    module = copy.deepcopy(model).eval().float()
    if any(isinstance(m, _QuantMixin) for m in module.modules()):
        refuse("model", "a float model (use export_onnx for a quantized one)", type(model).__name__)
    return atomic_write_bytes(Path(path), _to_bytes(module, example))


class OnnxRunner:
    """An ``onnxruntime.InferenceSession`` on the CPU, called like the model's logits.

    The weights of layers whose output stays float (ONNX Runtime cannot give them an integer
    kernel) are dequantized once here, in memory (:func:`_dequantize_float_layers`); every other
    quantized layer runs on ONNX Runtime's integer kernels. ``float_layers`` counts the former.

    Args:
        path: the ``.onnx`` file.
        threads: ONNX Runtime's intra-op threads (1: one core, as the benchmarks run).
        optimized_path: where ONNX Runtime writes the graph it runs after its fusions
            (optional; :func:`integer_op_counts` reads it).
    """

    def __init__(
        self, path: str | Path, threads: int = 1, optimized_path: str | Path | None = None
    ) -> None:
        _, ort = _onnx()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimized_path is not None:  # (ORT warns that the file is for this machine only)
            options.optimized_model_filepath = str(optimized_path)
            options.log_severity_level = 3
        data, self.float_layers = _dequantize_float_layers(Path(path).read_bytes())
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, pixel_values: torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.detach().float().cpu().numpy()  # host: ORT reads numpy
        return self.session.run(None, {self.input_name: pixel_values})[0]


def load_onnx(path: str | Path, threads: int = 1) -> OnnxRunner:
    """An :class:`OnnxRunner` on ``path`` (ONNX Runtime, CPU, all graph optimisations)."""
    return OnnxRunner(path, threads=threads)


def integer_op_counts(path: str | Path) -> dict[str, int]:
    """``{op_type: count}`` of the graph ONNX Runtime runs for ``path`` after its optimisations.

    The integer kernels among them are :data:`INTEGER_OPS`."""
    onnx, _ = _onnx()
    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "optimized.onnx"
        OnnxRunner(path, optimized_path=optimized)
        graph = onnx.load(str(optimized)).graph
    return dict(collections.Counter(node.op_type for node in graph.node))

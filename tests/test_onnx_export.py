"""The integer ONNX export (hf_extensions.quantization.onnx_export) against the fake-quant model.

A tiny transformers ResNet (from its config, random weights, batch-norm statistics drawn with some
negative gammas) is quantized round-to-nearest and exported. Two references:

* the exported graph run as written (ONNX Runtime with its graph optimisations off) computes the
  fake-quant model: logits equal to float rounding. Any wrong scale, zero point, clip range or
  batch-norm fold breaks this.
* with the optimisations on, ONNX Runtime fuses the QDQ convolutions into integer kernels
  (QLinearConv) and its only departure is the int32 rounding of the bias: logits within
  ``LOGIT_TOLERANCE`` of their spread, top-1 equal on nearly all images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from transformers import ResNetConfig, ResNetForImageClassification

from hf_extensions.quantization import MetaAugConfig, quantize_model_rtn
from hf_extensions.quantization.onnx_export import (
    INTEGER_OPS,
    LOGIT_TOLERANCE,
    export_float_onnx,
    export_onnx,
    integer_op_counts,
    load_onnx,
)


def _tiny_resnet(seed: int = 0) -> ResNetForImageClassification:
    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=5,
    )
    model = ResNetForImageClassification(config).eval()
    with torch.no_grad():  # trained-looking batch norms, a few with negative gamma
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.randn(n).abs() + 0.5)
                module.weight[::3] *= -1
                module.bias.copy_(torch.randn(n) * 0.3)
                module.running_mean.copy_(torch.randn(n) * 0.3)
                module.running_var.copy_(torch.rand(n) + 0.5)
    return model


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _quantized(weight_bits: int, activation_bits: int) -> ResNetForImageClassification:
    model = _tiny_resnet()
    # every layer's input quantized (the stem too), so that every conv runs as an integer kernel
    config = MetaAugConfig(
        weight_bits=weight_bits, activation_bits=activation_bits, quantize_first_layer_input=True
    )
    return quantize_model_rtn(model, config, _images(32, 1))


def _run_unoptimised(path, images: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": images.numpy()})[0]


def _fake_quant_logits(model, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(images).logits.numpy()


@pytest.mark.parametrize("bits", [(8, 8), (4, 4), (2, 4)])
def test_graph_as_written_equals_the_fake_quant_model(tmp_path, bits):
    model = _quantized(*bits)
    path = export_onnx(model, _images(2, 0), tmp_path / "model.onnx")
    images = _images(16, 2)
    np.testing.assert_allclose(
        _run_unoptimised(path, images), _fake_quant_logits(model, images), rtol=0, atol=1e-4
    )


def test_integer_kernels_match_the_fake_quant_model_within_tolerance(tmp_path):
    model = _quantized(4, 8)
    path = export_onnx(model, _images(2, 0), tmp_path / "model.onnx")
    counts = integer_op_counts(path)
    assert counts.get("QLinearConv", 0) >= 2, counts  # each block's first conv, at least
    images = _images(64, 3)
    runner = load_onnx(path)
    got = runner(images)
    want = _fake_quant_logits(model, images)
    # The runner's in-memory dequantization of the float-output layers changes no number.
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    plain = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert runner.float_layers >= 3  # stem, second convs, classifier
    np.testing.assert_allclose(
        got, plain.run(None, {"pixel_values": images.numpy()})[0], rtol=0, atol=1e-5
    )
    assert np.abs(got - want).mean() <= LOGIT_TOLERANCE * want.std()
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95


def test_weights_are_stored_as_the_models_integers(tmp_path):
    model = _quantized(4, 4)
    path = export_onnx(model, _images(2, 0), tmp_path / "model.onnx")
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weights = [
        inits.get(node.input[0]) for node in graph.node if node.op_type == "DequantizeLinear"
    ]
    weights = [w for w in weights if w is not None and w.ndim >= 2]
    assert weights and all(w.dtype in (np.int8, np.uint8) for w in weights)
    assert not any(a.dtype == np.float32 and a.ndim >= 2 for a in inits.values())
    # W4 (q - z) lies in [-15, 15]; the first and last layer are 8-bit.
    assert sum(np.abs(w.astype(np.int32)).max() <= 15 for w in weights) == len(weights) - 2


def test_integer_weights_take_a_third_of_the_float_bytes(tmp_path):
    float_model = _tiny_resnet()
    quantized = _quantized(8, 8)
    int_path = export_onnx(quantized, _images(2, 0), tmp_path / "int.onnx")
    float_path = export_float_onnx(float_model, _images(2, 0), tmp_path / "float.onnx")

    def tensor_bytes(path):
        return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)

    # 8-bit weights plus per-channel scales: about a quarter of float32 (graph text aside).
    assert tensor_bytes(int_path) < 0.35 * tensor_bytes(float_path)
    assert int_path.stat().st_size < float_path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float.onnx", "int.onnx"]


def test_refuses_what_it_cannot_export(tmp_path):
    with pytest.raises(ValueError, match="QuantConv2d and QuantLinear"):
        export_onnx(_tiny_resnet(), _images(2, 0), tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="example_inputs"):
        export_onnx(_quantized(8, 8), {"pixel_values": _images(2, 0)}, tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="float model"):
        export_float_onnx(_quantized(8, 8), _images(2, 0), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_integer_op_names_are_ort_operators():
    assert "QLinearConv" in INTEGER_OPS and "Conv" not in INTEGER_OPS


def test_merge_into_quantization_keeps_every_other_key(tmp_path):
    from benchmarks.quantization_runtime import merge_into_quantization

    existing = {
        "metrics": {"metaaug": {"heldout_acc": [1.0]}},
        "ratios": {"metaaug_calib_time_vs_base": 2.0},
        "notes": "kept",
    }
    (tmp_path / "quantization.json").write_text(json.dumps(existing))
    report = {
        "config": {"primary": "w4a8", "onnxruntime": "x", "tolerance_pp": 0.5},
        "ratios": {"int_vs_float_latency": 0.9, "int_vs_float_size": 0.3},
        "metrics": {
            "ort_int_w4a8": {
                key: [0.0]
                for key in (
                    "int_accuracy",
                    "accuracy_diff_pp",
                    "agreement",
                    "ort_int_vs_ort_float_b64",
                    "ort_int_vs_ort_float_b1",
                    "int_bytes",
                )
            },
            "ort_float": {"float_bytes": 1},
        },
        "intervals": {},
    }
    for _ in range(2):  # re-running is idempotent
        merged = json.loads(merge_into_quantization(report, tmp_path).read_text())
    assert merged["ratios"] == {
        "metaaug_calib_time_vs_base": 2.0,
        "int_vs_float_latency": 0.9,
        "int_vs_float_size": 0.3,
    }
    assert merged["metrics"]["metaaug"] == existing["metrics"]["metaaug"]
    assert merged["notes"] == "kept" and "onnx_int" in merged["metrics"]
    assert [p.name for p in tmp_path.iterdir()] == ["quantization.json"]

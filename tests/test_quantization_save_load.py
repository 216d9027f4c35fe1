"""Quantized models save with ``save_pretrained`` and load with transformers' own loader."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForImageClassification

from hf_extensions.data import load_digits
from hf_extensions.models import tiny_vit_classifier
from hf_extensions.quantization import (
    QUANT_METHOD,
    MetaAugConfig,
    QuantConv2d,
    QuantLinear,
    fake_quantize,
    quantize_model_rtn,
)


def _inputs(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _vit(seed: int = 0) -> nn.Module:
    # from_pretrained picks SDPA attention when config.json names none; build with SDPA too so
    # that a reload runs the same kernels (eager vs SDPA differ by ~4e-8 in the logits).
    return tiny_vit_classifier(attn_implementation="sdpa", seed=seed)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x).logits


@pytest.fixture(scope="module")
def saved_w4a8(tmp_path_factory):
    """RTN W4A8 tiny ViT (8-bit first/last layers) saved as safetensors, with its logits."""
    torch.manual_seed(0)
    model = _vit(seed=0).eval()
    calib, test = _inputs(32, 0), _inputs(16, 1)
    float_logits = _logits(model, test)
    quantize_model_rtn(
        model, MetaAugConfig(method="brecq", weight_bits=4, activation_bits=8), calib
    )
    directory = tmp_path_factory.mktemp("w4a8")
    model.save_pretrained(directory)
    return model, directory, test, float_logits, _logits(model, test)


def test_config_dict_round_trip():
    config = MetaAugConfig(
        method="qdrop", weight_bits=2, activation_bits=None, modules_to_not_convert=["classifier"]
    )
    data = config.to_dict()
    assert data["quant_method"] == QUANT_METHOD
    back = MetaAugConfig.from_dict(json.loads(json.dumps(data)))
    assert back == config and back.activation_bits is None


def test_rtn_modules_follow_the_config():
    model = _vit(seed=0).eval()
    config = MetaAugConfig(
        weight_bits=4,
        activation_bits=8,
        modules_to_not_convert=["fc2"],
        quantize_first_layer_input=True,
    )
    quantize_model_rtn(model, config, _inputs(8))
    first = model.vit.embeddings.patch_embeddings.projection
    assert isinstance(first, QuantConv2d) and (first.weight_bits, first.activation_bits) == (8, 8)
    assert (model.classifier.weight_bits, model.classifier.activation_bits) == (8, 8)
    q_proj = model.vit.layers[0].attention.q_proj
    assert isinstance(q_proj, QuantLinear) and (q_proj.weight_bits, q_proj.activation_bits) == (
        4,
        8,
    )
    assert type(model.vit.layers[0].mlp.fc2) is nn.Linear
    # forward == F.linear(Q(x), Q(W)) with the stored scales (BRECQ Eq. 1 on both operands).
    x = torch.randn(3, 32)
    w_hat = fake_quantize(q_proj.weight, q_proj.weight_scale, q_proj.weight_zero_point, 0, 15, 0)
    x_hat = fake_quantize(x, q_proj.act_scale, q_proj.act_zero_point, 0, 255)
    with torch.no_grad():
        torch.testing.assert_close(q_proj(x), nn.functional.linear(x_hat, w_hat, q_proj.bias))
        assert len(torch.unique(w_hat[0])) <= 16


def test_activation_bits_need_calibration_inputs():
    with pytest.raises(ValueError, match=r"^`calibration_inputs` must be a tensor"):
        quantize_model_rtn(_vit(), MetaAugConfig(activation_bits=8))


def test_save_writes_quant_method_and_from_pretrained_is_bit_exact(saved_w4a8):
    model, directory, test, float_logits, quant_logits = saved_w4a8
    saved = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == QUANT_METHOD and saved["weight_bits"] == 4
    assert (directory / "model.safetensors").exists()
    assert not torch.equal(quant_logits, float_logits)  # the quantization does something

    loaded = AutoModelForImageClassification.from_pretrained(directory).eval()
    assert isinstance(loaded.config.quantization_config, MetaAugConfig)
    assert isinstance(loaded.classifier, QuantLinear)
    assert torch.equal(_logits(loaded, test), quant_logits)
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    assert any(k.endswith("act_scale") for k in got)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_weight_only_round_trip_and_resave(tmp_path):
    model = _vit(seed=1).eval()
    config = MetaAugConfig(
        method="qdrop", weight_bits=2, activation_bits=None, modules_to_not_convert=["classifier"]
    )
    quantize_model_rtn(model, config)
    assert type(model.classifier) is nn.Linear
    assert not any(k.endswith("act_scale") for k in model.state_dict())
    x = _inputs(8, 2)
    model.save_pretrained(tmp_path / "a")
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "a").eval()
    assert loaded.hf_quantizer.is_serializable() and not loaded.hf_quantizer.is_trainable
    loaded.save_pretrained(tmp_path / "b")  # a loaded quantized model saves again
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "b").eval()
    assert again.config.quantization_config == config
    assert torch.equal(_logits(again, x), _logits(model, x))


def test_fresh_process_load_is_bit_exact_and_needs_the_import(saved_w4a8, tmp_path):
    """One ``python -I`` process: load before and after ``import hf_extensions``.

    Without the import transformers does NOT raise: it logs "Unknown quantization type, got
    hf_extensions_metaaug ... we will skip the quantization", builds the float model and reports
    the scale buffers as unexpected keys -- so its logits differ from the quantized ones.
    """
    _, directory, test, _, quant_logits = saved_w4a8
    save_file({"x": test, "logits": quant_logits}, str(tmp_path / "ref.safetensors"))
    script = textwrap.dedent(
        f"""
        import json, torch
        from safetensors.torch import load_file
        from transformers import AutoModelForImageClassification
        ref = load_file({str(tmp_path / "ref.safetensors")!r})
        plain, info = AutoModelForImageClassification.from_pretrained(
            {str(directory)!r}, output_loading_info=True)
        with torch.no_grad():
            plain_logits = plain.eval()(pixel_values=ref["x"]).logits
        import hf_extensions  # the top-level import registers the quantizer
        model = AutoModelForImageClassification.from_pretrained({str(directory)!r}).eval()
        with torch.no_grad():
            logits = model(pixel_values=ref["x"]).logits
        print(json.dumps({{
            "plain_class": type(plain.classifier).__name__,
            "plain_unexpected": sorted(info["unexpected_keys"]),
            "plain_equal": torch.equal(plain_logits, ref["logits"]),
            "class": type(model.classifier).__name__,
            "equal": torch.equal(logits, ref["logits"]),
        }}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["plain_class"] == "Linear"
    assert "classifier.weight_scale" in result["plain_unexpected"]
    assert not result["plain_equal"]
    assert result["class"] == "QuantLinear"
    assert result["equal"]


def _train_mlp(train, epochs: int = 30) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    x, y = train
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def _tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(split["features"]).float(), torch.tensor(split["labels"]).long()


@torch.no_grad()
def _accuracy(model: nn.Module, data) -> float:
    x, y = data
    return (model(x).argmax(-1) == y).float().mean().item() * 100


def test_w8a8_rtn_keeps_digits_accuracy():
    digits = load_digits(seed=0, layout="vector")
    train, test = _tensors(digits["train"]), _tensors(digits["test"])
    model = _train_mlp(train)
    float_acc = _accuracy(model, test)
    assert float_acc > 90
    config = MetaAugConfig(weight_bits=8, activation_bits=8, first_last_8bit=False)
    with torch.no_grad():
        float_logits = model(test[0])
    quantize_model_rtn(model, config, train[0][:128])
    assert all(isinstance(m, QuantLinear) for m in model if not isinstance(m, nn.ReLU))
    with torch.no_grad():
        assert not torch.equal(model(test[0]), float_logits)
    # The bar is a drop of at most 0.5 point (measured: 96.39 -> 96.94, one more of
    # the 360 test digits right after quantization).
    assert float_acc - _accuracy(model, test) <= 0.5

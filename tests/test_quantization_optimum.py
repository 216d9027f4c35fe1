"""``MetaAugQuantizer`` (Optimum): quantize -> save -> reload bit-exact; integer export; refusals."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from hf_extensions.models import tiny_vit_classifier
from hf_extensions.quantization import (
    MetaAugConfig,
    MetaAugQuantizer,
    QuantConv2d,
    export_integer,
    load_integer_export,
    load_quantized,
)
from hf_extensions.quantization.export import pack_bits, unpack_bits
from hf_extensions.quantization.models import DigitsResNet


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def saved_vit(tmp_path_factory):
    """A tiny ViT quantized by MetaAug (tiny iteration counts) through the Optimum entry point."""
    directory = tmp_path_factory.mktemp("metaaug_vit")
    model = tiny_vit_classifier(attn_implementation="sdpa", seed=0)
    dataset = Dataset.from_dict({"pixel_values": _images(32, 0).numpy(), "labels": [0] * 32})
    config = MetaAugConfig(
        method="metaaug",
        weight_bits=4,
        activation_bits=4,
        iterations=4,
        meta_iterations=2,
        batch_size=8,
    )
    quantizer = MetaAugQuantizer.from_pretrained(model)
    qmodel = quantizer.quantize(
        directory, calibration_dataset=dataset, quantization_config=config, progress=False
    )
    x = _images(8, 1)
    with torch.no_grad():
        logits = qmodel.eval()(pixel_values=x).logits
    return quantizer, qmodel, directory, x, logits


def test_metaaug_quantizer_runs_meta_stage_on_inner_blocks_only(saved_vit):
    quantizer, qmodel, directory, _, _ = saved_vit
    result = quantizer.result
    assert result.blocks == [
        "vit.embeddings.patch_embeddings.projection",
        "vit.layers.0",
        "vit.layers.1",
        "classifier",
    ]
    assert sorted(result.meta) == ["vit.layers.0", "vit.layers.1"]
    assert set(result.losses) == set(result.blocks)
    saved = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert saved["method"] == "metaaug" and saved["iterations"] == 4
    # No reconstruction state is left in the saved model.
    assert not any("quantizer" in key for key in qmodel.state_dict())


def test_integer_export_is_bit_exact_and_smaller(saved_vit):
    _, qmodel, directory, x, logits = saved_vit
    path = export_integer(qmodel, directory / "int")
    assert path.stat().st_size < 0.5 * (directory / "model.safetensors").stat().st_size
    rebuilt = load_integer_export(
        tiny_vit_classifier(attn_implementation="sdpa", seed=5), path.parent
    )
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(pixel_values=x).logits, logits)
    with pytest.raises(ValueError, match="config"):
        export_integer(torch.nn.Linear(2, 2), directory / "bad")


def test_torchvision_style_cnn_saves_and_loads_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = DigitsResNet(width=4).eval()
    config = MetaAugConfig(
        method="qdrop",
        weight_bits=2,
        activation_bits=4,
        iterations=3,
        quantize_first_layer_input=False,
    )
    quantizer = MetaAugQuantizer.from_pretrained(model)
    qmodel = quantizer.quantize(
        tmp_path / "q",
        calibration_dataset=_images(16, 0),
        quantization_config=config,
        progress=False,
    )
    assert isinstance(qmodel.layer1.conv1, QuantConv2d)
    # BRECQ / QDrop convention: first layer W8 on the float image, last layer W8A8.
    assert (qmodel.conv1.weight_bits, qmodel.conv1.activation_bits) == (8, None)
    assert (qmodel.fc.weight_bits, qmodel.fc.activation_bits) == (8, 8)
    x = _images(8, 1)
    loaded = load_quantized(DigitsResNet(width=4), tmp_path / "q")
    export_integer(qmodel, tmp_path / "int", config=config)
    rebuilt = load_integer_export(DigitsResNet(width=4), tmp_path / "int").eval()
    with torch.no_grad():
        expected = qmodel(x)
        assert torch.equal(loaded(x), expected)
        assert torch.equal(rebuilt(x), expected)
    # W2 weights take 2 bits of information: at most 4 distinct values per output channel.
    assert all(len(torch.unique(w)) <= 4 for w in qmodel.layer1.conv1.weight)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    q = torch.randint(0, 2**bits, (5, 3, 3), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (45 if bits > 4 else 23)
    assert torch.equal(unpack_bits(packed, bits, q.shape), q.to(torch.uint8))


def test_quantize_refuses_bad_arguments():
    quantizer = MetaAugQuantizer.from_pretrained(DigitsResNet(width=4))
    images = _images(4, 0)
    with pytest.raises(ValueError, match="calibration_dataset"):
        quantizer.quantize(None)
    with pytest.raises(ValueError, match="file_prefix"):
        quantizer.quantize(None, file_prefix="x", calibration_dataset=images)
    with pytest.raises(ValueError, match="image_column"):
        quantizer.quantize(None, calibration_dataset=Dataset.from_dict({"img": [[0.0]]}))
    with pytest.raises(ValueError, match="quantization_config"):
        quantizer.quantize(None, calibration_dataset=images, quantization_config=3)
    with pytest.raises(ValueError, match="unknown arguments"):
        quantizer.quantize(None, calibration_dataset=images, iterations=3)

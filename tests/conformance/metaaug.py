"""Conformance case of MetaAug post-training quantization (``MetaAugQuantizer``, an
Optimum-style quantizer). Baseline: ``meta_iterations=0`` equals QDrop, the method MetaAug
extends (Optimum has no reconstruction PTQ to compare with), bit for bit on a small ResNet:
weights, scales and outputs; the control runs two meta iterations. Reload: ``AutoModel`` after
``import hf_extensions`` (the settings live in config.json's quantization_config, not a card);
two processes: BRECQ, half a batch per rank."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForImageClassification

from conformance.case import Baseline, Case, Ranks, Saved, bad_values, probe_pixels
from hf_extensions.models import tiny_vit_classifier as vit
from hf_extensions.quantization import MetaAugConfig, MetaAugQuantizer
from hf_extensions.quantization.models import DigitsResNet


def _calibration_images(rows: int = 16) -> torch.Tensor:
    return torch.rand(rows, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def _quantize(model, config: MetaAugConfig, directory=None, accelerator=None):
    quantizer = MetaAugQuantizer.from_pretrained(model)
    quantized = quantizer.quantize(
        directory,
        calibration_dataset=_calibration_images(),
        quantization_config=config,
        accelerator=accelerator,
        progress=False,
    )
    return quantizer, quantized


_PTQ = dict(weight_bits=2, activation_bits=4, iterations=3, batch_size=8)


def _metaaug_baseline(tmp_path: Path) -> Baseline:
    """``meta_iterations=0`` is QDrop, the method MetaAug extends (Optimum has no
    reconstruction PTQ to compare with), bit for bit: weights, scales and outputs of a small
    ResNet. Control: two meta iterations (the transformation network T trained per block)."""
    del tmp_path
    result = {}
    for name, method, meta in (
        ("stock", "qdrop", 0),
        ("method", "metaaug", 0),
        ("control", "metaaug", 2),
    ):
        torch.manual_seed(0)
        config = MetaAugConfig(method=method, meta_iterations=meta, **_PTQ)
        _, quantized = _quantize(DigitsResNet(width=4).eval(), config)
        tensors = {k: v for k, v in quantized.state_dict().items() if v.is_floating_point()}
        with torch.no_grad():
            tensors["logits"] = quantized(probe_pixels())
        result[name] = tensors
    return Baseline(result["method"], result["stock"], result["control"])


def _metaaug_outputs(model):
    with torch.no_grad():
        logits = model.eval()(pixel_values=probe_pixels()).logits
    method = model.config.quantization_config.method
    return {"logits": logits, "is_metaaug": torch.tensor(method == "metaaug")}


def _metaaug_save(directory: Path) -> Saved:
    model = vit(attn_implementation="sdpa", seed=0)
    config = MetaAugConfig(
        method="metaaug",
        weight_bits=4,
        activation_bits=4,
        iterations=4,
        meta_iterations=2,
        batch_size=8,
    )
    data = Dataset.from_dict({"pixel_values": _calibration_images(32).numpy(), "labels": [0] * 32})
    quantizer = MetaAugQuantizer.from_pretrained(model)
    quantized = quantizer.quantize(
        directory, calibration_dataset=data, quantization_config=config, progress=False
    )
    return Saved(_metaaug_outputs(quantized))


def _metaaug_reload(directory: Path):
    import hf_extensions  # noqa: F401  (the top-level import registers the quantizer)

    return _metaaug_outputs(AutoModelForImageClassification.from_pretrained(directory))


def _metaaug_ranks(output_dir: str, variant: str):
    """BRECQ on a global batch of 16: each of 2 ranks reconstructs on its half."""
    del output_dir
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = DigitsResNet(width=4).eval()
    initial = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    config = MetaAugConfig(
        method="brecq",
        weight_bits=2,
        activation_bits=4,
        iterations=8,
        batch_size=16,
        meta_iterations=2,
    )
    images = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    quantizer = MetaAugQuantizer.from_pretrained(model)
    accelerator = Accelerator()
    quantized = quantizer.quantize(
        None,
        calibration_dataset=images,
        quantization_config=config,
        accelerator=accelerator,
        progress=False,
    )
    final = {k: v for k, v in quantized.state_dict().items() if v.is_floating_point()}
    values = {
        "steps": config.iterations,
        "local_batch_size": quantizer.result.losses["layer1"]["local_batch_size"],
    }
    return values, initial, final


def _compare_reconstructions(two, one) -> None:
    """Each rank reconstructs on half of every global batch of 16; LSQ activation scales agree
    to float rounding, and hard AdaRound weights agree except where a float sum in another
    order flips a weight whose h(V) sits at 0.5 (nearly all agree exactly)."""
    assert [r.values["local_batch_size"] for r in two] == [8, 8]
    assert one.values["local_batch_size"] == 16
    for name, value in one.tensors.items():
        if not name.startswith("final/"):
            continue
        got = two[0].tensors[name]
        if name.endswith("act_scale"):
            torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-7)
        elif name.endswith("weight") and value.dim() > 1:
            same = (got == value).float().mean().item()
            assert same > 0.98, (name, same)


METAAUG = Case(
    id="metaaug",
    baseline=_metaaug_baseline,
    save=_metaaug_save,
    reload=_metaaug_reload,
    bad_configs=bad_values(
        MetaAugConfig,
        {},
        [
            ("method", "gptq"),
            ("weight_bits", 1),
            ("weight_bits", 9),
            ("weight_bits", True),
            ("activation_bits", 16),
            ("first_last_8bit", "yes"),
            ("modules_to_not_convert", "classifier"),
            ("quant_method", "bitsandbytes"),
            ("iterations", 0),
            ("batch_size", True),
            ("drop_prob", 1.5),
            ("warmup", -0.1),
            ("meta_iterations", -1),
            ("temperature", 0),
            ("inner_lr", -1.0),
            ("inner_lr", float("inf")),
            ("weight_lr", float("nan")),
            ("block_names", "layer1"),
            ("quantize_first_layer_input", 1),
            ("metaaug_base", "metaaug"),
            ("meta_balance", "sum"),
            ("weight_scale_lr", -1e-4),
        ],
    ),
    ranks=Ranks(_metaaug_ranks, compare=_compare_reconstructions),
    not_applicable={
        "card": "MetaAugQuantizer.quantize records the method and every setting in config.json's "
        "quantization_config (checked by the reload case: is_metaaug); the README card is written "
        "by recipes/quantization only",
    },
)

"""MetaAug's figures for :mod:`benchmarks.device_check`: a short calibration of a ResNet-18
(built from a config, 224 px, 32 images) or of the tiny digits ResNet, against its QDrop base.

Post-training calibration runs in fp32 (the quantizers' scales and rounding variables are
learned in fp32, as in the official code), so the bf16 and fp16 checks do not apply; what is
checked is that the calibration runs where the model is, gives finite outputs, and what it costs
against its base (the whole calibration, two reconstruction iterations and one meta step per
block: not a training step, so the ratio is of calibrations).
"""

from __future__ import annotations

import copy
import time

import torch

from benchmarks._device_steps import peak_memory_mib
from hf_extensions.quantization import MetaAugConfig, MetaAugQuantizer
from hf_extensions.quantization.models import DigitsResNet


def _model(real: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    generator = torch.Generator().manual_seed(6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if real:
            from transformers import ResNetConfig, ResNetForImageClassification

            config = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2],
                                  hidden_sizes=[64, 128, 256, 512], num_labels=10)  # fmt: skip
            model = ResNetForImageClassification(config).eval()
            images = torch.rand(32, 3, 224, 224, generator=generator)
        else:
            model = DigitsResNet(width=4).eval()
            images = torch.rand(16, 1, 8, 8, generator=generator)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device), images.to(device)


def _calibrate(model, images, method: str) -> tuple[torch.nn.Module, float]:
    config = MetaAugConfig(method=method, weight_bits=4, activation_bits=4, iterations=2,
                           batch_size=8, meta_iterations=1, seed=0)  # fmt: skip
    start = time.perf_counter()
    quantized = MetaAugQuantizer.from_pretrained(model).quantize(
        calibration_dataset=images, quantization_config=config, progress=False
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return quantized, time.perf_counter() - start


def check_metaaug(real: bool, batch: int, repeats: int) -> dict:
    """MetaAug's calibration against QDrop's: the ratio of medians over 3 runs (1 at the tiny
    size, where it is a smoke check: a calibration takes seconds on the CPU)."""
    del batch
    runs = min(repeats, 3) if real else 1
    model, images = _model(real)
    seconds: dict[str, list[float]] = {"qdrop": [], "metaaug": []}
    peak: dict[str, float | None] = {"qdrop": None, "metaaug": None}
    finite = True
    for _ in range(runs):
        for method in seconds:
            (quantized, elapsed), peak[method] = peak_memory_mib(
                lambda method=method: _calibrate(copy.deepcopy(model), images, method)
            )
            seconds[method].append(elapsed)
            with torch.no_grad():
                output = quantized(images[:4])
            logits = output.logits if hasattr(output, "logits") else output
            finite = finite and bool(torch.isfinite(logits).all())

    def median(values):
        return sorted(values)[len(values) // 2]

    return {
        "baseline_max_diff": None,
        "baseline_ok": None,
        "bf16_vs_fp32_max_diff": None,
        "fp32_step_size": None,
        "bf16_ok": None,  # calibration runs in fp32
        "fp16_overflow_skipped": None,
        "finite_outputs": finite,
        "step_ratio": median(seconds["metaaug"]) / median(seconds["qdrop"]),
        "stock_step_ms": median(seconds["qdrop"]) * 1e3,
        "peak_memory_mib": peak["metaaug"],
        "stock_peak_memory_mib": peak["qdrop"],
    }

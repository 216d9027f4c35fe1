"""Concept erasure's figures for :mod:`benchmarks.device_check`: one EAP step (model and
adversary) of ``ConceptEraser``, against an ESD step (the same loop without preservation)."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from benchmarks._device_steps import max_diff, peak_memory_mib
from benchmarks.harness import compare
from hf_extensions.mixed_precision import fp16_loss_scaling
from hf_extensions.models import tiny_stable_diffusion_pipeline
from hf_extensions.pipelines import ConceptEraser, ErasureConfig

CONCEPT = "a red circle"
WORDS = ["dog", "cat", "tree", "house", "car", "boat", "music", "river"]
#: The erasure loss is small (about 1e-4 on the tiny pipeline): 2^40 makes its fp16 backward
#: overflow where 2^24 does not.
OVERFLOW_SCALE = 2.0**40
#: Adam's first step moves every weight by about lr whatever the gradient's size, so bf16 is
#: judged on the direction of the update: its cosine with the fp32 update.
MIN_UPDATE_COSINE = 0.9


def _accelerator(bf16: bool) -> Accelerator:
    """A fresh accelerator in bf16 or fp32. Accelerate keeps one state per process;
    ``AcceleratorState._reset_state`` (private) is how transformers' TrainingArguments
    starts a new one too."""
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision="bf16" if bf16 else "no", cpu=not torch.cuda.is_available())


def _eraser(real: bool, method: str, accelerator: Accelerator) -> ConceptEraser:
    """An SD-width UNet (two levels of 320 / 640 channels, cross-attention 768, 32x32 latents)
    or the tiny pipeline, seed 0."""
    shape = dict(image_size=64, block_out_channels=(320, 640), text_hidden_size=768) if real else {}
    config = ErasureConfig(
        num_steps=1, learning_rate=1e-3, ddim_steps=4, k_closest=6, num_centers=4,
        candidates=WORDS, seed=0, progress_bar=False,
    )  # fmt: skip
    return ConceptEraser(tiny_stable_diffusion_pipeline(**shape), [CONCEPT], method, config,
                         accelerator=accelerator)  # fmt: skip


def _trained(eraser: ConceptEraser) -> list[torch.Tensor]:
    unet = eraser.accelerator.unwrap_model(eraser.unet)
    return [p.detach().float().clone() for p in unet.parameters() if p.requires_grad]


def _update(after: list[torch.Tensor], before: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(a - b).flatten() for a, b in zip(after, before, strict=True)])


def check_erasure(real: bool, batch: int, repeats: int) -> dict:
    """bf16 against fp32 (one EAP step), an overflowing fp16 step, EAP's step time over ESD's.
    No setting of EAP is ESD's step draw for draw (the adversary draws from the cycle's
    generator), so there is no baseline equality here; the CPU suite checks ESD as λ = 0."""
    del batch  # one cycle per step: the eraser's batch is one latent per cycle
    fp32 = _eraser(real, "eap", _accelerator(bf16=False))
    initial = _trained(fp32)
    fp32.step()
    step_size = max_diff(_trained(fp32), initial)
    bf16 = _eraser(real, "eap", _accelerator(bf16=True))
    bf16.step()
    bf16_diff = max_diff(_trained(bf16), _trained(fp32))
    cosine = float(
        torch.nn.functional.cosine_similarity(
            _update(_trained(bf16), initial), _update(_trained(fp32), initial), dim=0
        )
    )
    finite = all(torch.isfinite(t).all() for t in _trained(bf16))

    accelerator = _accelerator(bf16=False)
    with fp16_loss_scaling(accelerator, init_scale=OVERFLOW_SCALE) as scaler:
        overflow = _eraser(real, "eap", accelerator)  # prepared under fp16
        before = _trained(overflow)
        overflow.step()
        skipped = bool(accelerator.optimizer_step_was_skipped)
        halved = scaler.get_scale() == OVERFLOW_SCALE / 2
    unmoved = max_diff(_trained(overflow), before) == 0.0

    accelerator = _accelerator(bf16=True)
    eap, esd = _eraser(real, "eap", accelerator), _eraser(real, "esd", accelerator)
    timing = compare(esd.step, {"eap": eap.step}, warmup=2, repeats=repeats)
    return {
        "baseline_max_diff": None,
        "baseline_ok": None,
        "bf16_vs_fp32_max_diff": bf16_diff,
        "fp32_step_size": step_size,
        "bf16_update_cosine": cosine,
        "bf16_ok": finite and cosine >= MIN_UPDATE_COSINE,
        "fp16_overflow_skipped": skipped and halved and unmoved,
        "step_ratio": timing["ratios"]["eap"],
        "stock_step_ms": timing["baseline"].median * 1e3,
        "peak_memory_mib": peak_memory_mib(eap.step)[1],
        "stock_peak_memory_mib": peak_memory_mib(esd.step)[1],
    }

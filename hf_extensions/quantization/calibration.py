"""The calibration driver: quantize a model block by block in forward order (BRECQ / QDrop /
MetaAug).

:func:`reconstruct_model` initialises every quantizer by round-to-nearest, then reconstructs the
blocks one after another with :mod:`~hf_extensions.quantization.reconstruction`, training
MetaAug's transformation network for each block first (:mod:`~hf_extensions.quantization.metaaug`)
when ``method="metaaug"``. It sits above both so that neither imports the other.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hf_extensions.quantization.config import MetaAugConfig
from hf_extensions.quantization.metaaug import train_transform
from hf_extensions.quantization.models import model_logits
from hf_extensions.quantization.modules import check_quantizable, quantize_model_rtn
from hf_extensions.quantization.reconstruction import (
    _inside,
    capture_block,
    find_blocks,
    quant_layers,
    reconstruct_block,
    set_quant_enabled,
)
from hf_extensions.validation import check_finite_tensor

__all__ = ["ReconstructionResult", "reconstruct_model"]


@dataclass
class ReconstructionResult:
    """Per-block log of :func:`reconstruct_model` (names, seconds, losses, MetaAug history)."""

    blocks: list[str]
    seconds: dict[str, float] = field(default_factory=dict)
    losses: dict[str, dict[str, float]] = field(default_factory=dict)
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    total_seconds: float = 0.0


def reconstruct_model(
    model: nn.Module,
    images: torch.Tensor,
    config: MetaAugConfig,
    accelerator: Any = None,
    progress: bool = True,
    callback: Callable[[str, dict[str, float]], None] | None = None,
) -> ReconstructionResult:
    """Quantize ``model`` in place by block reconstruction in forward order.

    1. Round-to-nearest initialisation (:func:`quantize_model_rtn`: Lp grid-searched per-channel
       weight scales, per-tensor activation scales from the float model's layer inputs).
    2. Every quantized layer is switched to full precision; then, block by block in forward order,
       the block's layers are switched on and reconstructed (blocks after it stay in float, as in
       the BRECQ / MetaAug code). ``method="metaaug"`` first trains the transformation network T
       for the block and reconstructs on the union of ``images`` and ``T(images)`` with the
       base method ``config.metaaug_base``; ``method="genie"`` learns the per-channel weight
       scales with the rounding (Genie-M).

    The model ends in eval mode with its parameters' ``requires_grad`` as they were.

    Args:
        model (`nn.Module`):
            The float image model (a ``transformers`` image classifier or any ``nn.Module``
            taking images); its convertible ``nn.Linear`` / ``nn.Conv2d`` layers are replaced
            in place by their quantized forms.
        images (`torch.Tensor`):
            Calibration inputs ``[N, C, H, W]``, on the model's device. The round-to-nearest
            initialisation uses the first ``max(config.batch_size, 256)`` of them.
        config (`MetaAugConfig`):
            The method, bit widths and calibration settings; the run is seeded by
            ``config.seed``.
        accelerator (`accelerate.Accelerator`, *optional*, defaults to `None`):
            With several processes, each process takes its slice of every reconstruction batch
            and the gradients are averaged; the progress bar shows on the local main process
            only. `None`: one process.
        progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over the blocks.
        callback (`Callable[[str, dict[str, float]], None]`, *optional*, defaults to `None`):
            Called after each block with its name and its losses (``first_rec_loss``,
            ``last_rec_loss``, ``local_batch_size``).

    Returns:
        `ReconstructionResult`: the blocks in order, with the seconds and losses of each (and
        MetaAug's loss history for the blocks it ran on).
    """
    check_quantizable(model, config)
    check_finite_tensor("images", images)  # NaN inputs give NaN scales everywhere
    start = time.perf_counter()
    device = images.device
    # host: the calibration generator, seeded from the config, the same on every device
    generator = torch.Generator().manual_seed(config.seed)
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    fp_model = copy.deepcopy(model)
    quantize_model_rtn(model, config, images[: max(config.batch_size, 256)])
    for p in model.parameters():  # the quantized copies of the layers are new parameters
        p.requires_grad_(False)
    blocks = find_blocks(model, images[:2], config.max_block_layers, config.block_names)
    layer_names = [n for n, _ in quant_layers(model)]
    edge = {layer_names[0], layer_names[-1]}
    base = config.metaaug_base if config.method == "metaaug" else config.method
    drop_prob = 0.0 if base == "brecq" else config.drop_prob
    fp_logits = None
    if config.method == "metaaug" and config.meta_iterations > 0:
        with torch.no_grad():  # the float model never changes: its logits serve every block
            fp_logits = torch.cat([model_logits(fp_model, c) for c in images.split(256)])
    result = ReconstructionResult(blocks=blocks)
    set_quant_enabled(model, False)
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    iterator = blocks
    if show:
        from tqdm.auto import tqdm

        iterator = tqdm(
            blocks, desc=f"{config.method} W{config.weight_bits}A{config.activation_bits}"
        )
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(config.seed)
        for name in iterator:
            block_start = time.perf_counter()
            block = model.get_submodule(name)
            set_quant_enabled(block, True)
            block_images = images
            is_edge = any(_inside(layer, name) for layer in edge)
            if config.method == "metaaug" and not is_edge and config.meta_iterations > 0:
                transform, history = train_transform(
                    model, fp_model, name, images, config, generator, fp_logits
                )
                with torch.no_grad():
                    block_images = torch.cat([images, transform(images)])
                result.meta[name] = history
            q_data = capture_block(model, name, block_images, need_output=False)
            fp_data = capture_block(fp_model, name, block_images, need_output=True)
            losses = reconstruct_block(
                block,
                q_data,
                fp_data,
                config,
                drop_prob,
                generator,
                accelerator,
                learn_weight_scale=base == "genie",
            )
            result.losses[name] = losses
            result.seconds[name] = time.perf_counter() - block_start
            if callback is not None:
                callback(name, losses)
    set_quant_enabled(model, True)
    for n, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(n, False))
    result.total_seconds = time.perf_counter() - start
    return result

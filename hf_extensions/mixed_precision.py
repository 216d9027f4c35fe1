"""accelerate's fp16 loss-scaling path on any device, the CPU included: what the test suite and
``python -m benchmarks.device_check --tiny`` check fp16 steps with where there is no GPU.

accelerate sets an ``Accelerator`` up for fp16 only on a device with fp16 autocast support: in
``Accelerator.__init__``'s fp16 branch it turns ``native_amp`` on and creates a GradScaler
(``torch.amp.GradScaler`` for the device). On the CPU it skips that branch (1.16: fp16 silently
becomes fp32; earlier releases raise). :func:`fp16_loss_scaling` performs the same assignments on
an existing accelerator, so that everything after them is accelerate's own public fp16 code:
``accelerator.autocast`` / the prepared model's forward in float16 autocast, ``backward`` scaling
the loss, ``clip_grad_norm_`` unscaling before clipping, ``AcceleratedOptimizer.step`` through
``scaler.step`` / ``scaler.update`` and ``optimizer_step_was_skipped``.

Private upstream internal touched: ``AcceleratorState._mixed_precision`` (accelerate keeps the
mixed-precision mode there; ``Accelerator.mixed_precision`` reads it). If a release renames it,
:func:`fp16_loss_scaling` raises naming it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate.utils import AutocastKwargs


@contextlib.contextmanager
def fp16_loss_scaling(
    accelerator, *, init_scale: float = 2.0**16, autocast: bool = True
) -> Iterator[object]:
    """Put ``accelerator`` in accelerate's fp16 state (scaler + native AMP) inside the block.

    Args:
        accelerator: the ``accelerate.Accelerator`` (a Trainer's ``trainer.accelerator``); enter
            the block before the model and optimizer are prepared (before ``trainer.train()``).
        init_scale: the GradScaler's initial scale.
        autocast: compute in float16 autocast (accelerate's fp16); ``False`` keeps fp32 compute
            through accelerate's public ``AutocastKwargs(enabled=False)`` handler, so that a
            step under loss scaling can be compared exactly with the fp32 step.

    Yields the GradScaler. Everything is restored on exit (the mixed-precision mode lives in
    accelerate's process-wide shared state).
    """
    state = accelerator.state
    if not hasattr(state, "_mixed_precision"):
        raise AttributeError(
            "accelerate's AcceleratorState has no `_mixed_precision` any more (renamed upstream); "
            "hf_extensions/mixed_precision.py must follow the new name."
        )
    saved_state = state._mixed_precision
    saved = {
        name: getattr(accelerator, name) for name in ("native_amp", "scaler", "autocast_handler")
    }
    scaler = torch.amp.GradScaler(accelerator.device.type, init_scale=init_scale)
    state._mixed_precision = "fp16"
    accelerator.native_amp = True
    accelerator.scaler = scaler
    accelerator.autocast_handler = None if autocast else AutocastKwargs(enabled=False)
    try:
        yield scaler
    finally:
        state._mixed_precision = saved_state
        for name, value in saved.items():
            setattr(accelerator, name, value)

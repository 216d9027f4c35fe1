"""Refuse a multi-process launch whose processes never formed a process group.

``accelerate launch`` with a multi-GPU config (``recipes/accelerate_configs/cpu_2proc.yaml``,
``--multi_gpu``) or ``torchrun`` on a machine without a GPU starts N processes with
``WORLD_SIZE=N``, but Accelerate falls back to "not distributed" unless ``ACCELERATE_USE_CPU`` is
set: each process then reports one process, trains alone on the whole data set and writes the
same ``output_dir`` as the others, without a warning. Every hf-extensions trainer, the erasure
trainer and the quantizer call :func:`require_process_group` once their ``Accelerator`` exists.
The recipes avoid the trap themselves (:func:`hf_extensions.cli.use_cpu_for_multiprocess_launch`).
"""

from __future__ import annotations

import os

__all__ = ["require_process_group"]


def require_process_group(num_processes: int, where: str) -> None:
    """Raise when the launcher started several processes (``WORLD_SIZE`` > 1) but ``where``'s
    ``Accelerator`` sees ``num_processes == 1``: the processes are not data parallel."""
    launched = os.environ.get("WORLD_SIZE", "1")
    try:
        launched_processes = int(launched)
    except ValueError:
        return
    if launched_processes > 1 and num_processes == 1:
        raise RuntimeError(
            f"{where}: the launcher started {launched_processes} processes (WORLD_SIZE="
            f"{launched}) but they formed no process group, so each would train alone on all the "
            "data and write the same output_dir. On a machine without a GPU, export "
            "ACCELERATE_USE_CPU=true before `accelerate launch` (a gloo process group); with "
            "GPUs, check that each process sees one (CUDA_VISIBLE_DEVICES) and the backend "
            "initialises."
        )

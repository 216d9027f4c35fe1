"""Run a script on several CPU processes with ``accelerate launch`` and collect what each rank saw.

Data-parallel correctness ("2 processes give the same parameters as 1 process at the same global
batch") is tested on CPU: :func:`launch` starts ``accelerate launch --multi_gpu --num_processes N``
with ``ACCELERATE_USE_CPU=true`` (a gloo process group; see ``hf_extensions.cli``), and the script
calls :func:`report` on every rank to leave JSON values and tensors in a folder that
:func:`launch` reads back, one :class:`RankReport` per rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPORT_DIR_ENV = "HF_EXTENSIONS_REPORT_DIR"


@dataclass
class RankReport:
    """What one process reported: JSON ``values`` and named ``tensors``."""

    rank: int
    values: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def report(
    values: Mapping | None = None, tensors: Mapping[str, torch.Tensor] | None = None
) -> None:
    """Called from the launched script on every rank; a no-op when not run by :func:`launch`."""
    directory = os.environ.get(REPORT_DIR_ENV)
    if directory is None:
        return
    path = Path(directory)
    rank = _rank()
    (path / f"rank{rank}.json").write_text(json.dumps(dict(values or {}), default=float))
    if tensors:
        save_file(
            {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()},
            str(path / f"rank{rank}.safetensors"),
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    script: str | os.PathLike,
    args: Sequence[str] = (),
    *,
    num_processes: int = 2,
    timeout: float = 600,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
) -> list[RankReport]:
    """Run ``script args`` on ``num_processes`` CPU processes and return their reports by rank.

    ``num_processes == 1`` runs plain ``python script`` (no process group), the reference a
    data-parallel run is compared with. ``cwd`` (default: the current directory) is put on
    ``PYTHONPATH`` so that scripts can import ``recipes``. Raises ``RuntimeError`` with the
    processes' output when the run fails or a rank did not report.
    """
    if num_processes < 1:
        raise ValueError(f"`num_processes` must be >= 1, got {num_processes}.")
    cwd = Path(cwd or os.getcwd()).resolve()
    with tempfile.TemporaryDirectory(prefix="hfx-ranks-") as report_dir:
        run_env = {
            **os.environ,
            **(env or {}),
            REPORT_DIR_ENV: report_dir,
            "ACCELERATE_USE_CPU": "true",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            ),
        }
        if num_processes == 1:
            command = [sys.executable, str(script), *args]
        else:
            command = [
                sys.executable, "-m", "accelerate.commands.launch",
                "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port()),
                str(script), *args,
            ]  # fmt: skip
        result = subprocess.run(
            command, cwd=cwd, env=run_env, capture_output=True, text=True, timeout=timeout
        )
        output = f"$ {' '.join(command)}\n{result.stdout}\n{result.stderr}"
        if result.returncode != 0:
            raise RuntimeError(
                f"launch failed with exit code {result.returncode}:\n{output[-6000:]}"
            )
        reports = []
        for rank in range(num_processes):
            values_path = Path(report_dir) / f"rank{rank}.json"
            if not values_path.exists():
                raise RuntimeError(f"rank {rank} did not report:\n{output[-6000:]}")
            tensors_path = values_path.with_suffix(".safetensors")
            reports.append(
                RankReport(
                    rank=rank,
                    values=json.loads(values_path.read_text()),
                    tensors=load_file(str(tensors_path)) if tensors_path.exists() else {},
                )
            )
        return reports

"""What every zoo fixture's build shares: the seeded training loop, the card and the atomic save.

A builder trains its model with :func:`train`, measures its quality on a fixed evaluation set
*after* the weights were cast to their stored dtype, and writes the folder with
:func:`save_fixture`: the model's own ``save_pretrained`` files, ``quality.json`` (the measured
numbers a test holds the reloaded fixture to), ``training_curve.json`` and a ``README.md`` card
with the data, the command, the curve and the quality.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hf_extensions.atomic import atomic_save, atomic_write_text

__all__ = ["BuildOptions", "TrainingCurve", "read_quality", "save_fixture", "train"]

QUALITY_FILE = "quality.json"
CURVE_FILE = "training_curve.json"


@dataclass
class BuildOptions:
    """How a fixture is built: where to, for how long, from which seed, how loudly."""

    output_dir: Path
    steps: int | None = None  # None: the fixture's own default
    seed: int = 0
    progress: bool = True


@dataclass
class TrainingCurve:
    """Mean training loss per logging window, with the step it ends at."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def falls(self) -> bool:
        """Whether the mean loss of the last quarter of the windows is below the first
        quarter's (a short build logs one step per window: single windows are noisy)."""
        quarter = max(1, len(self.losses) // 4)
        if len(self.losses) < 2:
            return False
        first, last = self.losses[:quarter], self.losses[-quarter:]
        return sum(last) / len(last) < sum(first) / len(first)

    def to_dict(self) -> dict[str, list]:
        return {"step": self.steps, "loss": self.losses}


def train(
    parameters: list[torch.nn.Parameter],
    step_loss: Callable[[int], torch.Tensor],
    *,
    steps: int,
    lr: float,
    description: str,
    weight_decay: float = 0.05,
    warmup: int | None = None,
    log_every: int | None = None,
    progress: bool = True,
) -> TrainingCurve:
    """AdamW with linear warm-up and cosine decay to 10% for ``steps`` steps.

    ``step_loss(step)`` draws the step's batch (from a generator keyed by the step, so a
    resumed or shortened build sees the same batches) and returns the loss to minimise.
    """
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20) if warmup is None else warmup

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_fraction = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress_fraction))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    log_every = log_every or max(1, steps // 50)
    curve, window = TrainingCurve(), []
    bar = tqdm(range(steps), desc=description, disable=not progress, dynamic_ncols=True)
    for step in bar:
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        window.append(loss.detach().item())  # one host sync per step: fine at these sizes
        if len(window) == log_every or step == steps - 1:
            curve.steps.append(step + 1)
            curve.losses.append(sum(window) / len(window))
            bar.set_postfix(loss=f"{curve.losses[-1]:.4f}")
            window = []
    return curve


def keyed_batches(total: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of step ``step``'s batch of ``batch_size`` rows out of ``total`` (with
    replacement across steps, without within one), from a generator keyed by (seed, step)."""
    from hf_extensions.seeding import keyed_generator

    generator = keyed_generator(seed, step)
    return torch.randperm(total, generator=generator)[:batch_size]


def _curve_table(curve: TrainingCurve, rows: int = 10) -> str:
    stride = max(1, len(curve.steps) // rows)
    picked = list(range(0, len(curve.steps), stride))
    if picked[-1] != len(curve.steps) - 1:
        picked.append(len(curve.steps) - 1)
    lines = ["| step | training loss |", "|---:|---:|"]
    lines += [f"| {curve.steps[i]} | {curve.losses[i]:.4f} |" for i in picked]
    return "\n".join(lines)


def _threads() -> str:
    count = torch.get_num_threads()
    return f"{count} thread{'' if count == 1 else 's'}"


def card_text(
    name: str,
    summary: str,
    *,
    data: str,
    model: str,
    load: str,
    quality: dict[str, float],
    curve: TrainingCurve,
    seconds: float,
) -> str:
    """The fixture's ``README.md``: what it is, its data, how to rebuild and load it, its
    training curve and its measured quality."""
    quality_rows = "\n".join(f"| {key} | {value:.4f} |" for key, value in quality.items())
    return f"""---
library_name: transformers
tags: [hf-extensions, zoo, fixture]
---
# zoo/{name}

{summary}

## Data
{data}

## Model
{model}

## Rebuild
```bash
python -m hf_extensions.zoo build {name}
```
Deterministic on one machine; built in {seconds / 60:.1f} minutes on {platform.machine()} CPU
({_threads()}, torch {torch.__version__}).

## Load
```python
{load}
```

## Measured quality
Measured after the weights were cast to their stored dtype; `tests/test_zoo.py` reloads the
folder in a fresh process and holds it to these numbers (`{QUALITY_FILE}`).

| metric | value |
|---|---:|
{quality_rows}

## Training curve
{_curve_table(curve)}
"""


def save_fixture(
    output_dir: Path,
    save_model: Callable[[Path], None],
    *,
    card: str,
    quality: dict[str, float],
    curve: TrainingCurve,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the fixture folder atomically: the model (``save_model(staging_dir)``), the card,
    ``quality.json`` (plus ``extra`` facts such as the held-out styles) and the curve."""
    output_dir = Path(output_dir)
    with atomic_save(output_dir) as staging:
        save_model(staging)
        atomic_write_text(staging / "README.md", card)
        record = {"quality": quality, **(extra or {})}
        atomic_write_text(staging / QUALITY_FILE, json.dumps(record, indent=2) + "\n")
        atomic_write_text(staging / CURVE_FILE, json.dumps(curve.to_dict()) + "\n")
    return output_dir


def read_quality(folder: str | Path) -> dict[str, Any]:
    """The ``quality.json`` record of a built fixture folder."""
    path = Path(folder) / QUALITY_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {folder} is not a built zoo fixture; build it with "
            "`python -m hf_extensions.zoo build NAME`."
        )
    return json.loads(path.read_text())


@dataclass
class Timer:
    """Wall time since construction, for the card's 'built in' line."""

    start: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def batches(total: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices covering ``range(total)`` (evaluation batches)."""
    for start in range(0, total, batch_size):
        yield slice(start, min(total, start + batch_size))

"""Shared machinery of the benchmarks: timing, side-by-side comparison, reports and discovery.

The convention (see ``benchmarks/README.md``): a benchmark is a module of this package with a
``main(argv=None) -> BenchmarkReport`` function. It measures a method and its baseline in the
same process, prints a table, and writes ``benchmarks/results/<name>.json`` (+ an optional PNG).
Timings are reported as ratios against the baseline measured in the same run, because absolute
times only mean something together with the machine they were measured on (which the JSON names).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import gc
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_extensions.atomic import atomic_write_text

PACKAGE_DIR = Path(__file__).resolve().parent
RESULTS_DIR = PACKAGE_DIR / "results"
NOT_BENCHMARKS = frozenset({"harness", "__main__", "__init__"})

MetricValue = float | int | Sequence[float]


# ----------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class TimingResult:
    """Wall-clock samples of one callable, in seconds per call.

    Each sample is the time of ``number`` back-to-back calls divided by ``number``, so calls much
    shorter than the timer's resolution can still be measured. Summaries are robust ones (median,
    inter-quartile range, minimum): a stray slow sample (a context switch) moves them little.
    """

    samples: tuple[float, ...]
    number: int = 1

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    @property
    def q1(self) -> float:
        return float(np.percentile(self.samples, 25))

    @property
    def q3(self) -> float:
        return float(np.percentile(self.samples, 75))

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def min(self) -> float:
        return float(np.min(self.samples))

    def metrics(self, unit: str = "ms", prefix: str = "") -> dict[str, float]:
        """``{prefix}median_{unit}``, ``..iqr..``, ``..min..`` for a report's metrics table."""
        scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
        return {
            f"{prefix}median_{unit}": self.median * scale,
            f"{prefix}iqr_{unit}": self.iqr * scale,
            f"{prefix}min_{unit}": self.min * scale,
        }


def _synchronize() -> None:
    """Wait for queued CUDA work, so the timer measures the work and not only its launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _sample(
    fn: Callable[[], Any],
    number: int,
    setup: Callable[[], Any] | None,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Seconds per call of ``number`` calls of ``fn`` (``setup`` runs first, untimed).

    ``clock`` is read once before the calls and once after them. The garbage collector is paused
    while timing (as ``timeit`` does), so a collection triggered by one candidate's garbage is
    not charged to another.
    """
    if setup is not None:
        setup()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        _synchronize()
        start = clock()
        for _ in range(number):
            fn()
        _synchronize()
        elapsed = clock() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    return elapsed / number


def _check_counts(warmup: int, repeats: int, number: int) -> None:
    if warmup < 0 or repeats < 1 or number < 1:
        raise ValueError(
            f"need warmup >= 0, repeats >= 1, number >= 1; got {warmup}, {repeats}, {number}."
        )


def time_callable(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    repeats: int = 20,
    number: int = 1,
    setup: Callable[[], Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> TimingResult:
    """Time ``fn()``: ``warmup`` untimed samples, then ``repeats`` samples of ``number`` calls.

    ``setup`` (optional) runs before every sample, warm-up included, outside the timed region.
    ``clock`` returns the current time in seconds; real benchmarks keep the default
    ``time.perf_counter``. It is there for tests: a fake clock that advances only when the timed
    callable says so makes every sample exact, with no sleeping and no dependence on load.
    """
    _check_counts(warmup, repeats, number)
    for _ in range(warmup):
        _sample(fn, number, setup, clock)
    return TimingResult(tuple(_sample(fn, number, setup, clock) for _ in range(repeats)), number)


def compare(
    baseline: Callable[[], Any],
    candidates: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    repeats: int = 20,
    number: int = 1,
    setup: Callable[[], Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Time a baseline and candidates interleaved, and their ratios to the baseline.

    Samples are taken round-robin (one sample of each callable per round, the order rotated every
    round), so slow drift of the machine (frequency scaling, other load) reaches every callable
    alike instead of biasing whichever was timed last. ``warmup``, ``repeats``, ``number``,
    ``setup`` and ``clock`` mean what they mean for :func:`time_callable` (``clock``: for tests,
    a fake clock; real benchmarks keep ``time.perf_counter``).

    Returns:
        ``{"baseline": TimingResult, "candidates": {name: TimingResult},
        "ratios": {name: candidate median / baseline median}}``.
    """
    _check_counts(warmup, repeats, number)
    if not candidates:
        raise ValueError("`candidates` must name at least one callable to compare.")
    fns: dict[str | None, Callable[[], Any]] = {None: baseline, **candidates}
    keys = list(fns)
    samples: dict[str | None, list[float]] = {key: [] for key in keys}
    for round_index in range(warmup + repeats):
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            seconds = _sample(fns[key], number, setup, clock)
            if round_index >= warmup:
                samples[key].append(seconds)
    base = TimingResult(tuple(samples[None]), number)
    timed = {name: TimingResult(tuple(samples[name]), number) for name in candidates}
    return {
        "baseline": base,
        "candidates": timed,
        "ratios": {name: result.median / base.median for name, result in timed.items()},
    }


# ----------------------------------------------------------------------------- reporting


def _cpu_model() -> str | None:
    """The CPU's marketing name on Linux (``platform.processor()`` is often empty there)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """What absolute times depend on: platform, CPU, Python, torch, threads, CUDA device."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of per-seed values; std is 0 for one value."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("`values` is empty.")
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return float(array.mean()), std


def _format_value(value: MetricValue | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple, np.ndarray)):
        mean, std = mean_std(value)
        return f"{mean:.4g} ± {std:.2g} (n={len(value)})"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    return f"{value:.4g}"


def _to_json(value: Any) -> Any:
    """``json.dump`` fallback for numpy scalars and arrays."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


@dataclass
class BenchmarkReport:
    """What one benchmark run measured.

    Attributes:
        name: the benchmark's name; files are written as ``<name>.json`` / ``<name>.png``.
        metrics: ``{method: {metric: value}}``; a value is a number, or a list of per-seed numbers
            (printed as mean ± std).
        ratios: ``{name: value}``, e.g. ``{"trainer/plain": 1.7}``: candidate over baseline, both
            measured in this run.
        config: the settings the run used (optional, written when given).
        notes: free text on how to read the numbers (optional, written when given).
        protocol: the protocol the run followed, committed before its results (optional; the
            evidence benchmarks write their module docstring here).
        intervals: ``{comparison: PairedInterval.to_dict()}`` of paired per-seed differences
            (optional; :func:`benchmarks.protocol.paired_interval`).
        machine: filled by :func:`machine_info` when the report is created.
    """

    name: str
    metrics: dict[str, dict[str, MetricValue]]
    ratios: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    notes: str | None = None
    protocol: str | None = None
    intervals: dict[str, dict[str, Any]] | None = None
    machine: dict[str, Any] = field(default_factory=machine_info)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document: ``machine``, ``metrics``, ``ratios`` (+ ``config``, ``notes``,
        ``protocol``, ``intervals`` when given)."""
        document: dict[str, Any] = {
            "machine": self.machine,
            "metrics": self.metrics,
            "ratios": self.ratios,
        }
        for key in ("config", "notes", "protocol", "intervals"):
            if getattr(self, key) is not None:
                document[key] = getattr(self, key)
        return document

    def write(self, results_dir: str | Path = RESULTS_DIR) -> Path:
        """Write ``<results_dir>/<name>.json`` and return its path."""
        path = Path(results_dir) / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, default=_to_json, ensure_ascii=False) + "\n"
        return atomic_write_text(path, text)

    def format_table(self) -> str:
        """Metrics as a plain aligned text table (one row per method), then the ratios."""
        columns: list[str] = []
        for row in self.metrics.values():
            columns.extend(metric for metric in row if metric not in columns)
        header = ["method", *columns]
        rows = [
            [method, *(_format_value(values.get(metric)) for metric in columns)]
            for method, values in self.metrics.items()
        ]
        widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
        lines = [f"== {self.name} =="]
        for line in [header, *rows]:
            lines.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
            if line is header:
                lines.append("  ".join("-" * width for width in widths))
        lines.extend(f"ratio {name}: {value:.3f}" for name, value in self.ratios.items())
        for name, interval in (self.intervals or {}).items():
            lines.append(
                f"paired {name}: {interval['mean']:+.4g} "
                f"[{interval['low']:+.4g}, {interval['high']:+.4g}] (n={interval['n']})"
            )
        return "\n".join(lines)

    def print_table(self) -> None:
        """Print :meth:`format_table`."""
        print(self.format_table())


def get_pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (plots are only saved)."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "benchmark plots need matplotlib: pip install 'hf-extensions[plot]'"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(fig, name: str, results_dir: str | Path = RESULTS_DIR) -> Path:
    """Save a matplotlib figure as ``<results_dir>/<name>.png``, close it, return the path."""
    path = Path(results_dir) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    get_pyplot().close(fig)
    return path


def make_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark shares (``--results-dir``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS_DIR, help="where JSON and PNG files go"
    )
    return parser


# ----------------------------------------------------------------------------- registry


def discover_benchmarks(package_dir: str | Path = PACKAGE_DIR) -> list[str]:
    """Names of the modules in ``package_dir`` that define a top-level ``main`` function.

    The source is parsed, not imported, so listing benchmarks costs no heavy imports.
    """
    names = []
    for path in sorted(Path(package_dir).glob("*.py")):
        if path.stem in NOT_BENCHMARKS or path.stem.startswith("_"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            names.append(path.stem)
    return names


# ----------------------------------------------------------------------------- Trainer steps


def trainer_step_fn(trainer, num_training_steps: int) -> Callable[[dict[str, Any]], Any]:
    """One optimizer step of a ``transformers.Trainer`` on a batch, outside ``trainer.train()``.

    Prepares the trainer the way ``Trainer._prepare_for_training`` does (optimizer created, then
    wrapped by ``accelerator.prepare``, then the scheduler), and returns ``step(inputs)`` running
    the work of one synchronised step of the training loop: ``training_step`` (forward, loss,
    backward), ``optimizer.step()``, ``lr_scheduler.step()``, ``model.zero_grad()``. It returns the
    detached loss. Gradient clipping runs when ``args.max_grad_norm > 0``; callbacks, logging,
    the data loader and the loop's per-step gradient-norm report are left out.

    This is how every Trainer-subclass benchmark times its ``training_step`` against the stock one.
    """
    trainer.create_optimizer()
    model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    trainer.create_scheduler(num_training_steps=num_training_steps)
    trainer.model_wrapped = model
    # Set by the training loop before each step; training_step divides the loss by it.
    trainer.current_gradient_accumulation_steps = 1
    max_grad_norm = trainer.args.max_grad_norm

    def step(inputs: dict[str, Any]):
        loss = trainer.training_step(model, inputs)
        if max_grad_norm is not None and max_grad_norm > 0:
            trainer.accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        return loss

    return step


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads (``<= 0``: leave as is), then restore.

    Benchmarks of tiny models use one thread: on a small shared machine a second thread waiting
    for a busy core only adds noise. Restoring keeps ``python -m benchmarks`` runs independent.
    """
    before = torch.get_num_threads()
    if count > 0:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def optimisation_arguments(settings: Any) -> dict[str, Any]:
    """``TrainingArguments`` keywords of a benchmark's shared optimisation settings (a dataclass
    with ``optim``, ``learning_rate``, ``weight_decay``, ``epochs``, ``batch_size``): a cosine
    schedule and no gradient clipping, the same for every method compared."""
    return {
        "optim": settings.optim,
        "learning_rate": settings.learning_rate,
        "weight_decay": settings.weight_decay,
        "num_train_epochs": settings.epochs,
        "per_device_train_batch_size": settings.batch_size,
        "lr_scheduler_type": "cosine",
        "max_grad_norm": 0.0,
    }


def quiet_training_arguments(output_dir: str, **overrides: Any) -> dict[str, Any]:
    """``TrainingArguments`` keywords for a benchmark run: CPU, seed 0, no saving, logging,
    progress bar or reporting. ``overrides`` replace or add keys."""
    return {
        "output_dir": output_dir,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "dataloader_pin_memory": False,
        "seed": 0,
        **overrides,
    }

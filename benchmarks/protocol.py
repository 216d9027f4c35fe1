"""The statistics of the evidence benchmarks: paired intervals over seeds and tuning on a grid.

Every evidence benchmark follows one protocol, written in its module docstring and committed
before its results: each arm is tuned on the validation split with the same budget, on a grid
whose optimum must lie inside it (:func:`tune_on_grid` extends a grid past an edge optimum by the
rule given up front, never after looking at test numbers); then every arm runs the same paired
seeds and the claim is read from the paired difference's 95% interval (:func:`paired_interval`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class PairedInterval:
    """Mean of the paired per-seed differences ``method − baseline`` with a 95% t-interval."""

    mean: float
    low: float
    high: float
    n: int
    differences: tuple[float, ...]

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def verdict(self, higher_is_better: bool = True) -> str:
        """``better`` / ``worse`` when the interval excludes 0, else ``no detectable difference``."""
        if not self.excludes_zero:
            return "no detectable difference"
        return "better" if (self.mean > 0) == higher_is_better else "worse"

    def to_dict(self, higher_is_better: bool = True) -> dict[str, Any]:
        document = asdict(self)
        document["differences"] = list(self.differences)
        document["verdict"] = self.verdict(higher_is_better)
        document["higher_is_better"] = higher_is_better
        return document


def paired_interval(
    method: Sequence[float], baseline: Sequence[float], confidence: float = 0.95
) -> PairedInterval:
    """The ``confidence`` t-interval of the mean of ``method[i] − baseline[i]`` over paired seeds.

    Raises when the sequences differ in length or hold fewer than two pairs (no interval).
    """
    method_values = np.asarray(method, dtype=np.float64)
    baseline_values = np.asarray(baseline, dtype=np.float64)
    if method_values.shape != baseline_values.shape or method_values.ndim != 1:
        raise ValueError(
            f"`method` and `baseline` must be paired per seed (same length), got "
            f"{method_values.shape} and {baseline_values.shape}."
        )
    if method_values.size < 2:
        raise ValueError("a paired interval needs at least 2 seeds; pass more seeds.")
    differences = method_values - baseline_values
    mean = float(differences.mean())
    sem = float(differences.std(ddof=1) / np.sqrt(differences.size))
    half = float(stats.t.ppf(0.5 + confidence / 2, differences.size - 1)) * sem
    return PairedInterval(mean, mean - half, mean + half, int(differences.size),
                          tuple(float(d) for d in differences))  # fmt: skip


@dataclass(frozen=True)
class GridSearch:
    """What :func:`tune_on_grid` tried: every value's validation score, the best, the grid."""

    best: Hashable
    scores: dict[Any, float]
    grid: tuple[Any, ...]
    extended: int

    @property
    def inside(self) -> bool:
        """Whether the best value is not at an edge of the (possibly extended) grid."""
        return len(self.grid) >= 3 and self.best not in (self.grid[0], self.grid[-1])

    def to_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "scores": {str(k): v for k, v in self.scores.items()},
            "grid": list(self.grid),
            "optimum_inside_grid": self.inside,
            "extensions": self.extended,
        }


def tune_on_grid(
    grid: Sequence[float],
    score: Callable[[float], float],
    *,
    factor: float | None = None,
    max_extensions: int = 2,
    higher_is_better: bool = True,
    log: Callable[[str], None] = print,
) -> GridSearch:
    """The grid value with the best validation ``score``; an edge optimum extends the grid.

    ``grid`` is sorted ascending. When the best value sits at an edge and ``factor`` is given,
    the grid grows past that edge by one geometric step (``value * factor`` above,
    ``value / factor`` below; a lower edge of 0 is not extended) up to ``max_extensions`` times.
    Ties go to the smaller value (the weaker setting). The result says whether the optimum ended
    inside the grid; a benchmark reports it either way.
    """
    values = sorted(grid)
    if not values:
        raise ValueError("`grid` is empty; give at least one value.")
    scores: dict[float, float] = {}
    sign = 1.0 if higher_is_better else -1.0
    extended = 0
    while True:
        for value in values:
            if value not in scores:
                scores[value] = float(score(value))
                log(f"  tune {value:g}: validation {scores[value]:.4f}")
        best = max(values, key=lambda v: (sign * scores[v], -v))
        if factor is None or extended >= max_extensions or len(values) < 2:
            break
        if best == values[-1]:
            values.append(values[-1] * factor)
        elif best == values[0] and values[0] > 0:
            values.insert(0, values[0] / factor)
        else:
            break
        extended += 1
    return GridSearch(best, dict(sorted(scores.items())), tuple(values), extended)

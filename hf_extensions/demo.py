"""What ``make demo`` shows for one method: its figures beside its baseline's, on a zoo fixture.

A recipe's ``demo()`` returns a :class:`Comparison`: the same metrics measured for the baseline
(the stock way to do the job: a stock ``Trainer``, zero-shot CLIP, round-to-nearest, the
unedited pipeline, DDIM) and for the method, on the same data and budget, plus the quality of the
trained fixture they start from. :func:`run_comparison` runs both arms of a recipe through
:func:`hf_extensions.cli.run_demo`: the baseline is the method's own recipe with the flags that
switch its mechanism off (``--rho 0``: the stock step, as the conformance suite checks), so
both arms share every other setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Comparison", "run_comparison"]


@dataclass
class Comparison:
    """A method beside its baseline.

    Args:
        baseline (`str`): what the baseline is, e.g. ``"stock Trainer (AdamW)"``.
        metrics (`dict[str, tuple[float, float]]`): metric -> ``(baseline, method)``; the first
            metric is the headline of the demo's figure.
        lower_is_better (`set[str]`): the metrics where smaller wins (NLL, ECE, W1, ...).
        fixture (`str`, *optional*): the zoo fixture both arms start from, e.g. ``"vit"``.
        fixture_quality (`dict[str, float]`): that fixture's own measured quality.
    """

    baseline: str
    metrics: dict[str, tuple[float, float]]
    lower_is_better: set[str] = field(default_factory=set)
    fixture: str | None = None
    fixture_quality: dict[str, float] = field(default_factory=dict)

    def gain(self, metric: str) -> float:
        """Method minus baseline, signed so that positive means the method is better."""
        baseline, method = self.metrics[metric]
        sign = -1.0 if metric in self.lower_is_better else 1.0
        return sign * (method - baseline)

    def verdict(self, metric: str, tie: float = 1e-3) -> str:
        """``"better"``, ``"worse"`` or ``"tie"`` (NaN, or within ``tie`` times the larger
        magnitude of the two values) for the method."""
        gain = self.gain(metric)
        scale = max(abs(value) for value in self.metrics[metric])
        if math.isnan(gain) or abs(gain) <= tie * scale:
            return "tie"
        return "better" if gain > 0 else "worse"


def run_comparison(
    *,
    method: Callable[[list[str]], Any],
    baseline_name: str,
    baseline_flags: Sequence[str],
    config: str | Path,
    summary: Mapping[str, str] | Callable[[Any], dict],
    flags: Sequence[str] = (),
    lower_is_better: Sequence[str] = (),
    fixture: str | None = None,
    fixture_argument: str | None = "model_name_or_path",
) -> Comparison:
    """Run the baseline recipe and the method recipe on the same YAML with the same ``flags``;
    summarise both with ``summary``.

    The baseline is the method's recipe with ``baseline_flags``, which switch the mechanism
    off (e.g. ``--rho 0``).

    With ``fixture``, both arms get ``--<fixture_argument> <its built folder>`` (the YAML's
    relative ``zoo/<name>`` then need not match the working directory), and the comparison
    carries the fixture's measured quality."""
    from hf_extensions.cli import run_demo
    from hf_extensions.zoo import fixture_path
    from hf_extensions.zoo.building import read_quality

    if fixture and fixture_argument:
        flags = [*flags, f"--{fixture_argument}", str(fixture_path(fixture))]
    before = run_demo(method, config, summary, *flags, *baseline_flags)
    after = run_demo(method, config, summary, *flags)
    quality = read_quality(fixture_path(fixture))["quality"] if fixture else {}
    return Comparison(
        baseline=baseline_name,
        metrics={name: (before[name], after[name]) for name in after},
        lower_is_better=set(lower_is_better),
        fixture=fixture,
        fixture_quality=quality,
    )

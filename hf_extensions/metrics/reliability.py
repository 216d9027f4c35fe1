"""Reliability diagrams (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017, Fig. 1).

A reliability diagram plots, for equal-width bins of confidence (max probability), the accuracy
of the examples in each bin against the bin: a calibrated model lies on the diagonal. The bins
and the ECE come from :func:`hf_extensions.metrics.functional.calibration_bins` and
:func:`~hf_extensions.metrics.functional.expected_calibration_error`, so the figure shows exactly
the numbers the metrics report. matplotlib is imported only when a diagram is drawn (install
``hf-extensions[plot]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hf_extensions.metrics.functional import calibration_bins, expected_calibration_error

__all__ = ["reliability_diagram"]


def reliability_diagram(
    probabilities: Any,
    references: Any,
    *,
    n_bins: int = 15,
    from_logits: bool = False,
    ax: Any = None,
    label: str | None = None,
    color: str = "C0",
    show_gap: bool = True,
    show_counts: bool = False,
    title: str | None = None,
):
    """Draw a reliability diagram on ``ax`` (a new figure's axes by default) and return ``ax``.

    Args:
        probabilities: (N, C) class probabilities, or logits with ``from_logits=True``.
        references: (N,) integer labels.
        n_bins: number of equal-width confidence bins (15, as for the project's ECE).
        ax: a matplotlib ``Axes`` to draw on.
        label: legend label; the ECE is appended, e.g. ``"DML (ECE 0.031)"``.
        color: colour of the accuracy bars.
        show_gap: hatch the gap between each bin's accuracy and its mean confidence.
        show_counts: write the number of examples above each non-empty bin.
        title: axes title.

    Bars are the per-bin accuracies (empty bins have no bar); the hatched boxes span from the
    accuracy to the bin's mean confidence; the dashed diagonal is perfect calibration.
    """
    bins = calibration_bins(probabilities, references, n_bins=n_bins, from_logits=from_logits)
    ece = expected_calibration_error(
        probabilities, references, n_bins=n_bins, from_logits=from_logits
    )
    if ax is None:
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "reliability diagrams need matplotlib: pip install 'hf-extensions[plot]'"
            ) from error
        _, ax = plt.subplots(figsize=(4, 4))
    filled = bins.counts > 0
    left = bins.edges[:-1][filled]
    width = np.diff(bins.edges)[filled]
    accuracy = bins.accuracy[filled]
    confidence = bins.confidence[filled]
    text = f"ECE {ece:.3f}" if label is None else f"{label} (ECE {ece:.3f})"
    ax.bar(
        left,
        accuracy,
        width=width,
        align="edge",
        color=color,
        edgecolor="black",
        linewidth=0.5,
        label=text,
    )
    if show_gap:
        ax.bar(
            left,
            confidence - accuracy,
            bottom=accuracy,
            width=width,
            align="edge",
            color="none",
            edgecolor="red",
            hatch="//",
            linewidth=0.5,
            label="gap to confidence",
        )
    if show_counts:
        for x, w, y, n in zip(left, width, accuracy, bins.counts[filled]):
            ax.text(x + w / 2, min(y, 0.95) + 0.02, str(int(n)), ha="center", fontsize=6)
    ax.plot([0, 1], [0, 1], ls="--", color="gray", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    if title is not None:
        ax.set_title(title)
    return ax

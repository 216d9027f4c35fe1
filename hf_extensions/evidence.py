"""What the evidence benchmarks measured for each method: one statement for cards, demo and README.

A method's claim is tested by a benchmark of ``benchmarks/`` whose protocol is committed before
its results (paired seeds, tuned arms, a 95% interval). Its outcome is written here once, as an
:class:`Evidence`, and read from here by every place that tells a user what the method does:
:func:`hf_extensions.hub.build_model_card` appends it to the card of an artifact of the method,
``make demo`` prints it under the method's single-seed demo row, and the README quotes it
verbatim (``tests/test_evidence.py`` holds the three, and the numbers, to the benchmark's JSON).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EVIDENCE", "Evidence", "evidence_for", "format_interval"]

VERDICTS = ("reproduced", "partly reproduced", "not reproduced")


@dataclass(frozen=True)
class Evidence:
    """The outcome of one method's evidence benchmark.

    Attributes:
        benchmark: the module ``benchmarks/<benchmark>.py`` (results in
            ``benchmarks/results/<benchmark>.json``); also the demo entry's name.
        methods: the card method ids (``build_model_card(method=...)``) the statement applies to.
        claim: the paper's claim, as tested.
        verdict: ``"reproduced"``, ``"partly reproduced"`` or ``"not reproduced"``.
        intervals: the keys of the JSON's ``intervals`` that decide the verdict -> the scale the
            summary quotes each at (100: points of a fraction, one decimal; 1: three decimals),
            as :func:`format_interval` writes it.
        summary: what was measured, with the intervals, in plain words.
    """

    benchmark: str
    methods: tuple[str, ...]
    claim: str
    verdict: str
    intervals: dict[str, float]
    summary: str

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"`verdict` must be one of {VERDICTS}, got {self.verdict!r}.")

    @property
    def command(self) -> str:
        return f"python -m benchmarks.{self.benchmark}"

    def markdown(self) -> str:
        """The card section."""
        return (
            f"## Evidence\n\nClaim: {self.claim} **{self.verdict.capitalize()}** on this "
            f"project's benchmark (`{self.command}`, protocol committed before its results, "
            f"paired seeds, 95% intervals): {self.summary}\n"
        )

    def line(self) -> str:
        """The demo's one line."""
        return f"{self.verdict} ({self.command}): {self.summary}"


#: benchmark name -> its evidence; filled in as each evidence benchmark lands.
EVIDENCE: dict[str, Evidence] = {}


def format_interval(mean: float, low: float, high: float, scale: float) -> str:
    """``+1.2 [+0.3, +2.1]``: a paired difference and its interval, as summaries quote them."""
    digits = 1 if scale == 100 else 3
    return f"{scale * mean:+.{digits}f} [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"


def evidence_for(method: str) -> Evidence | None:
    """The evidence of the method whose card id or benchmark name is ``method``, if any."""
    if method in EVIDENCE:
        return EVIDENCE[method]
    return next((e for e in EVIDENCE.values() if method in e.methods), None)

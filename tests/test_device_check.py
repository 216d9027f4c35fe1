"""The CPU (tiny-size) mode of ``python -m benchmarks.device_check`` (issue 27)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from benchmarks import _device_steps, device_check


@pytest.fixture(scope="module")
def report():
    return device_check.run(tiny=True, repeats=3)


def test_every_method_passes_every_check(report):
    assert set(report.metrics) == set(device_check.CHECKS)
    assert device_check.failures(report) == []


def test_figures_are_measured_not_defaults(report):
    """The numbers come from the runs (no timing is asserted: timings are reported, not tested)."""
    for name, figures in report.metrics.items():
        assert math.isfinite(figures["step_ratio"]) and figures["step_ratio"] > 0, name
        assert figures["stock_step_ms"] > 0, name
        if figures["bf16_ok"] is not None:  # None: calibration runs in fp32 (MetaAug)
            assert figures["fp32_step_size"] > 0, name
            assert figures["bf16_vs_fp32_max_diff"] > 0, name
        assert report.ratios[f"{name}_step"] == figures["step_ratio"]


def test_a_method_off_its_baseline_fails_the_baseline_check(monkeypatch):
    sam = _device_steps.METHODS["sam"]
    monkeypatch.setitem(
        _device_steps.METHODS, "sam", dataclasses.replace(sam, baseline={"rho": 0.05})
    )
    broken = device_check.run(tiny=True, methods=["sam"], repeats=1)
    assert device_check.failures(broken) == ["sam: baseline_ok"]

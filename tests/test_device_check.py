"""The CPU (tiny-size) mode of ``python -m benchmarks.device_check`` (issue 27)."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks import _device_steps, device_check


@pytest.fixture(scope="module")
def report():
    return device_check.run(tiny=True, repeats=3)


def test_every_method_passes_every_check(report):
    assert set(report.metrics) == set(device_check.CHECKS)
    assert device_check.failures(report) == []
    assert report.config["seconds"] < 120


def test_figures_are_measured_not_defaults(report):
    for name, figures in report.metrics.items():
        if name in _device_steps.METHODS:  # several passes: costs more than the stock step
            assert figures["step_ratio"] > 1.2, name
        else:  # one denoiser call per step, like DDIM's
            assert 0.5 < figures["step_ratio"] < 2.0, name
        assert figures["fp32_step_size"] > 0, name
        assert 0 < figures["bf16_vs_fp32_max_diff"] < figures["fp32_step_size"], name
        assert report.ratios[f"{name}_step"] == figures["step_ratio"]


def test_a_method_off_its_baseline_fails_the_baseline_check(monkeypatch):
    sam = _device_steps.METHODS["sam"]
    monkeypatch.setitem(
        _device_steps.METHODS, "sam", dataclasses.replace(sam, baseline={"rho": 0.05})
    )
    broken = device_check.run(tiny=True, methods=["sam"], repeats=1)
    assert device_check.failures(broken) == ["sam: baseline_ok"]

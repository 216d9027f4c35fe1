"""The S2N benchmark runs end to end on a tiny grid and writes the keys its claims are read from."""

from __future__ import annotations

import json

import pytest

from benchmarks.s2n import main


def test_benchmark_writes_the_claim_keys(tmp_path):
    report = main(
        [
            "--results-dir", str(tmp_path),
            "--rhos", "0", "1",
            "--steps", "10", "50",
            "--seeds", "0",
            "--samples-1d", "400",
            "--samples-2d", "60",
            "--mmse-points", "4",
            "--mmse-samples", "200",
            "--timing-repeats", "3",
            "--timing-warmup", "1",
            "--timing-number", "2",
        ]
    )  # fmt: skip
    document = json.loads((tmp_path / "s2n.json").read_text())
    assert set(document) == {"machine", "metrics", "ratios", "config", "notes"}
    metrics = document["metrics"]
    for key in ("ddim", "rho_best", "rho0", "rho1"):
        assert metrics["exact"][key]["w1_50"] > 0
        assert metrics["biased"][key]["w1_50"] > 0
    assert metrics["rho0_vs_ddim"]["max_abs_sample_diff"] == 0.0  # ρ = 0 is DDIM, bit for bit
    assert metrics["exact"]["rho_best"]["rho"] in (0.0, 1.0)
    for key in ("step_vs_ddim", "step_vs_ddim_rho0", "step_vs_ddim_rho1"):
        assert document["ratios"][key] > 0
    assert report.ratios["biased_rho1_vs_ddim_w1_50"] == pytest.approx(
        metrics["biased"]["rho1"]["w1_50"] / metrics["biased"]["ddim"]["w1_50"]
    )
    assert (tmp_path / "s2n.png").stat().st_size > 0

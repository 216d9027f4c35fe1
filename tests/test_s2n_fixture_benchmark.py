"""The S2N fixture benchmark's pieces: Fréchet distance and the merged s2n.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks.harness import BenchmarkReport
from benchmarks.s2n_fixture import frechet, write_gaussian_mixture, write_merged


def test_frechet_distance_is_zero_for_the_same_gaussian_and_sees_a_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20_000, 3))
    assert frechet(a, np.zeros(3), np.eye(3)) == pytest.approx(0.0, abs=0.01)
    # N(m, I) vs N(0, 4 I): |m|^2 + 3 (1 + 4 - 2 * 2)
    b = rng.normal(size=(20_000, 3)) + 1.0
    assert frechet(b, np.zeros(3), 4 * np.eye(3)) == pytest.approx(3 + 3, rel=0.02)


def test_s2n_json_keeps_both_benchmarks(tmp_path):
    gm = BenchmarkReport(name="s2n", metrics={"exact": {"w1_50": 0.1}}, machine={})
    write_gaussian_mixture(gm, tmp_path)  # no file yet: the whole file, as before
    assert json.loads((tmp_path / "s2n.json").read_text())["metrics"] == {"exact": {"w1_50": 0.1}}
    fixture = BenchmarkReport(name="s2n", metrics={"s2n_rho1": {"fd_10": 3.0}}, machine={})
    write_merged(fixture, tmp_path)
    document = json.loads((tmp_path / "s2n.json").read_text())
    assert document["metrics"] == {"s2n_rho1": {"fd_10": 3.0}}
    assert document["gaussian_mixture"]["metrics"] == {"exact": {"w1_50": 0.1}}
    gm2 = BenchmarkReport(name="s2n", metrics={"exact": {"w1_50": 0.2}}, machine={})
    write_gaussian_mixture(gm2, tmp_path)  # a rerun of benchmarks/s2n.py keeps the fixture's
    document = json.loads((tmp_path / "s2n.json").read_text())
    assert document["metrics"] == {"s2n_rho1": {"fd_10": 3.0}}
    assert document["gaussian_mixture"]["metrics"] == {"exact": {"w1_50": 0.2}}
    write_merged(fixture, tmp_path)  # and a rerun of this one keeps the mixture's
    assert json.loads((tmp_path / "s2n.json").read_text())["gaussian_mixture"]["metrics"] == {
        "exact": {"w1_50": 0.2}
    }

"""The evidence benchmarks' statistics: paired intervals and grid tuning (benchmarks/protocol.py)."""

import numpy as np
import pytest
from scipy import stats

from benchmarks.protocol import paired_interval, tune_on_grid


def test_paired_interval_equals_scipys_paired_t_interval():
    rng = np.random.default_rng(0)
    baseline = rng.normal(size=7)
    method = baseline + 0.3 + rng.normal(scale=0.2, size=7)
    interval = paired_interval(method, baseline)
    reference = stats.ttest_rel(method, baseline).confidence_interval(0.95)
    assert interval.low == pytest.approx(reference.low)
    assert interval.high == pytest.approx(reference.high)
    assert interval.mean == pytest.approx(np.mean(method - baseline))


def test_pairing_removes_the_seed_effect_that_an_unpaired_comparison_keeps():
    seed_effect = np.array([0.0, 5.0, -3.0, 8.0, 1.0])
    baseline = seed_effect
    method = seed_effect + np.array([0.1, 0.12, 0.09, 0.11, 0.1])
    interval = paired_interval(method, baseline)
    assert interval.excludes_zero and interval.verdict() == "better"
    assert interval.verdict(higher_is_better=False) == "worse"
    assert not paired_interval(method[::-1], baseline).excludes_zero  # pairs broken: no evidence


def test_paired_interval_refuses_unpaired_or_single_seed_inputs():
    with pytest.raises(ValueError, match="paired per seed"):
        paired_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 seeds"):
        paired_interval([1.0], [0.0])


def test_tune_on_grid_extends_past_an_edge_optimum_until_it_is_inside():
    search = tune_on_grid(
        [0.1, 0.3, 1.0], lambda v: -abs(np.log(v / 3.0)), factor=3, log=lambda _: None
    )
    assert search.best == pytest.approx(3.0) and search.inside and search.extended == 2
    capped = tune_on_grid(
        [0.1, 0.3, 1.0], lambda v: v, factor=3, max_extensions=1, log=lambda _: None
    )
    assert capped.best == pytest.approx(3.0) and not capped.inside


def test_tune_on_grid_breaks_ties_towards_the_weaker_setting_and_keeps_zero_as_a_floor():
    search = tune_on_grid([0.0, 0.1, 0.2], lambda v: 1.0, factor=2, log=lambda _: None)
    assert search.best == 0.0 and search.extended == 0

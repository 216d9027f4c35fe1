"""The fixture erasure benchmark's matching: each arm is read where it first reaches the level."""

from __future__ import annotations

import math
from types import SimpleNamespace

from benchmarks.erasure_fixture import ARMS, matched, summarize


def _row(step, erasure, preservation):
    return {"step": step, "erasure_success": erasure, "preservation": preservation,
            "heldout_recognition": 1.0, "heldout_drift": 0.1 * step}  # fmt: skip


def test_matched_point_is_the_first_checkpoint_at_the_level_not_the_last():
    path = [_row(10, 0.5, 0.9), _row(20, 0.92, 0.8), _row(30, 1.0, 0.6)]
    assert matched(path, 0.9)["step"] == 20
    assert matched(path, 1.0)["step"] == 30
    assert matched(path[:1], 0.9) is None


def test_summary_pairs_arms_at_their_own_matched_steps_and_skips_unreached_seeds():
    base = {k: 0.0 for k in ("erasure_success", "preservation", "heldout_recognition")}
    base["heldout_drift"] = 0.0
    per_seed = []
    for seed in range(3):
        run = {"base": base}
        for arm in ARMS:
            slow = arm == "eap"  # reaches the level one checkpoint later, better preserved
            path = [_row(10, 0.95 if not slow else 0.5, 0.5), _row(20, 0.95, 0.7 + 0.01 * seed)]
            if arm == "fixed" and seed == 2:
                path = [_row(10, 0.2, 0.9), _row(20, 0.3, 0.9)]  # never reaches the level
            run[arm] = {"path": path}
        per_seed.append(run)
    metrics, intervals, _ = summarize(per_seed, SimpleNamespace(level=0.9))
    assert metrics["esd"]["matched_step"] == [10, 10, 10]
    assert metrics["eap"]["matched_step"] == [20, 20, 20]
    assert metrics["eap"]["preservation"] == [0.7, 0.71, 0.72]
    assert math.isnan(metrics["fixed"]["preservation"][2])
    assert metrics["fixed"]["reached_level"] == [1.0, 1.0, 0.0]
    eap_esd = intervals["eap_minus_esd_preservation_at_matched_erasure"]
    assert eap_esd["n"] == 3 and eap_esd["low"] > 0
    assert intervals["fixed_minus_esd_preservation_at_matched_erasure"]["n"] == 2

"""The PromptDSI benchmark's pieces: the protocol as committed, the validation split used for
tuning, the per-query Hits@10 and the per-query bootstrap."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks import _prompt_dsi_checks as checks
from benchmarks import prompt_dsi
from hf_extensions.prompt_dsi.retrieval import stdlib_retrieval_corpus


def test_protocol_names_every_arm_grid_and_the_test():
    """The committed protocol names each arm, each grid value and the paired test, so neither the
    code nor the docstring can change alone."""
    doc = prompt_dsi.__doc__
    for arm in prompt_dsi.METHODS:
        assert f"``{arm}``" in doc, arm
    assert "{layer 1 only, all 6 layers} x {5, 20}" in doc
    assert {p["prompt_length"] for p in prompt_dsi.POOL_GRID} == {5, 20}
    assert "{1e-5, 3e-5, 1e-4, 3e-4}" in doc
    assert [p["encoder_lr"] for p in prompt_dsi.GRIDS["sequential"]] == [1e-5, 3e-5, 1e-4, 3e-4]
    assert "{0.5, 0.9} x {0.1, 1.0}" in doc
    assert all(len(grid) == 4 for grid in prompt_dsi.GRIDS.values())  # the same budget
    assert "Seeds** 0-4" in doc and "paired_interval" in doc and "95%" in doc
    assert ("prompt_dsi", "rows_only") in prompt_dsi.COMPARISONS


def test_validation_split_holds_out_one_training_query_per_d0_d1_document():
    """Tuning never trains on its validation queries, covers every D0/D1 document once, and
    reads no test span."""
    data = stdlib_retrieval_corpus(num_initial=6, docs_per_increment=3, num_test_queries=2)
    train, validation = prompt_dsi._validation_split(data, 2)
    assert sorted(validation["labels"]) == list(range(9))  # D0 (6) + D1 (3), one each
    held = set(zip(validation["labels"], validation["span_start"]))
    kept = set(zip(train["labels"], train["span_start"]))
    assert not held & kept
    assert len(train) + len(validation) == len(data["train"])
    assert not set(validation["text"]) & set(data["test"]["text"])


def test_hits10_per_query_matches_the_rank():
    scores = torch.zeros(2, 12)
    scores[0, 3] = 1.0  # query 0: its document first
    scores[1] = torch.arange(12.0)  # query 1: document 0 ranks last (12th)
    assert prompt_dsi.hits10_per_query(scores, [3, 0]).tolist() == [1.0, 0.0]


def test_query_bootstrap_is_zero_for_identical_arms_and_tracks_a_shift():
    rng = np.random.default_rng(0)
    a = [rng.integers(0, 2, 50).astype(float) for _ in range(3)]
    same = checks.query_bootstrap(a, a)
    assert same["low"] == same["high"] == same["mean"] == 0.0
    better = [np.ones(50) for _ in range(3)]
    worse = [np.r_[np.zeros(10), np.ones(40)] for _ in range(3)]
    interval = checks.query_bootstrap(better, worse)
    assert abs(interval["mean"] - 0.2) < 1e-12 and 0.0 < interval["low"] < 0.2 < interval["high"]

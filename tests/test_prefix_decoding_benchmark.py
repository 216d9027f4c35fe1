"""The decoding-cost benchmark writes its ratios into shared_prefix.json and keeps the rest."""

import json

from benchmarks import prefix_decoding


def test_merge_sets_the_decode_ratios_and_keeps_every_other_key(tmp_path):
    original = {"metrics": {"a": {"b": 1}}, "ratios": {"other": 2.0}, "config": {"x": 1}}
    (tmp_path / "shared_prefix.json").write_text(json.dumps(original))
    figures = {
        2048: {"ratio": 1.05, "plain_ms_per_token": 10.0, "prefix_ms_per_token": 10.5},
        512: {"ratio": 1.01, "plain_ms_per_token": 3.0, "prefix_ms_per_token": 3.03},
    }
    prefix_decoding.merge_into_shared_prefix(figures, tmp_path)
    merged = json.loads((tmp_path / "shared_prefix.json").read_text())
    assert merged["metrics"] == original["metrics"]
    assert merged["ratios"] == {
        "other": 2.0,
        "decode_prefix_vs_plain": 1.05,
        "decode_prefix_vs_plain_512": 1.01,
    }
    assert merged["config"]["x"] == 1
    assert merged["config"]["decode_ms"]["2048"]["prefix_ms_per_token"] == 10.5

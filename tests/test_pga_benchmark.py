"""The PGA benchmark's pieces: the protocol as committed, the tuning chain, the cached features,
the test-image bootstrap, and a smoke run that writes protocol and intervals."""

from __future__ import annotations

import json
import re

import pytest
import torch

from benchmarks import _pga_arms as arms
from benchmarks import pga
from hf_extensions.models import tiny_clip
from hf_extensions.pga.clip_prompts import DIGIT_WORDS, CLIPPromptLearner


def test_protocol_docstring_states_every_grid_and_the_test():
    """The committed protocol (the module docstring) names each arm's grid as the code uses it,
    the seeds, the sizes and the paired test (so neither can change without the other)."""
    doc = pga.__doc__
    for arm, (_, grid, _) in pga.TUNING.items():
        stated = re.search(rf"- ``{arm}``:[^{{]*grid {{([^}}]*)}}", doc)
        assert stated is not None, arm
        assert tuple(float(value) for value in stated.group(1).split(",")) == grid, arm
    assert "Seeds: 1, 2, 3, 4, 5" in doc and "paired_interval" in doc and "95%" in doc
    for name, size in pga.SIZES.items():
        assert str(size) in doc, name
    assert "factor 3" in doc and pga.GRID_FACTOR == 3.0 and pga.MAX_EXTENSIONS == 2


def test_settings_chain_erm_lr_and_rho_only_rho():
    """ERM tunes the learning rate with ρ = α = 0; the PGA arms take ERM's learning rate; PGA
    takes rho_only's ρ and tunes α; the ablations zero the other knob."""
    chosen = {"erm": pga.settings_for("erm", 1e-2, {})}
    assert chosen["erm"] == {"lr": 1e-2, "rho": 0.0, "align": 0.0}
    chosen["rho_only"] = pga.settings_for("rho_only", 0.03, chosen)
    assert chosen["rho_only"] == {"lr": 1e-2, "rho": 0.03, "align": 0.0}
    assert pga.settings_for("align_only", 0.01, chosen) == {"lr": 1e-2, "rho": 0.0, "align": 0.01}
    assert pga.settings_for("pga", 0.003, chosen) == {"lr": 1e-2, "rho": 0.03, "align": 0.003}


def test_feature_learner_on_cached_features_equals_the_image_tower():
    """Training and evaluating on features encoded once gives the predictions (and the loss)
    of the learner that runs the frozen image tower itself."""
    clip, tokenizer = tiny_clip(seed=0)
    images = torch.rand(6, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    learners = []
    for cls in (CLIPPromptLearner, arms.FeatureLearner):
        torch.manual_seed(0)
        learners.append(cls(clip, tokenizer, DIGIT_WORDS, ["source", "target"],
                            n_ctx_shared=2, n_ctx_domain=2))  # fmt: skip
    plain, cached = learners
    features = plain.image_features(images)
    torch.testing.assert_close(cached.predict_proba(features), plain.predict_proba(images))
    torch.testing.assert_close(
        cached.domain_loss(cached.image_features(features), labels, "target"),
        plain.domain_loss(plain.image_features(images), labels, "target"),
    )


def test_image_bootstrap_interval():
    """No difference gives a zero interval; a method right where the baseline is wrong on half
    the images gives about +0.5 with an interval around it; the result is seeded."""
    same = torch.ones(3, 200, dtype=torch.bool)
    assert arms.image_bootstrap(same, same) == {"mean": 0.0, "low": 0.0, "high": 0.0}
    baseline = torch.zeros(3, 200, dtype=torch.bool)
    method = torch.zeros(3, 200, dtype=torch.bool)
    method[:, ::2] = True
    result = arms.image_bootstrap(method, baseline)
    assert result["mean"] == pytest.approx(0.5)
    assert 0.4 < result["low"] < 0.5 < result["high"] < 0.6
    assert arms.image_bootstrap(method, baseline) == result


@pytest.mark.slow
def test_quick_run_writes_protocol_intervals_and_plot(tmp_path):
    """``--quick`` with an explicit results folder runs every arm through PGATrainer on the
    zoo CLIP and writes the JSON (metrics per arm, protocol, intervals) and the PNG."""
    pga.main(["--quick", "--results-dir", str(tmp_path)])
    document = json.loads((tmp_path / "pga.json").read_text())
    assert document["protocol"] == pga.__doc__
    assert set(document["metrics"]) == set(pga.ARMS)
    assert all(len(document["metrics"][arm]["target_accuracy"]) == 2 for arm in pga.ARMS)
    primary = document["intervals"]["pga-erm:target_accuracy"]
    assert primary["n"] == 2 and primary["low"] <= primary["mean"] <= primary["high"]
    assert document["config"]["pseudo_labels"]["threshold"] == 0.4
    assert (tmp_path / "pga.png").exists()

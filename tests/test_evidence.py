"""The benchmark evidence of each method (hf_extensions/evidence.py) says the same as its
benchmark's JSON, and the README, the model card and the demo say the same as it."""

import json
import re
from pathlib import Path

import pytest

from hf_extensions import evidence as evidence_module
from hf_extensions.evidence import EVIDENCE, Evidence, evidence_for, format_interval
from hf_extensions.hub import build_model_card
from recipes.demo import format_evidence

ROOT = Path(__file__).resolve().parents[1]


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def _verdict(outcomes: list[bool]) -> str:
    if all(outcomes):
        return "reproduced"
    return "partly reproduced" if any(outcomes) else "not reproduced"


@pytest.mark.parametrize("name", sorted(EVIDENCE))
def test_evidence_matches_its_benchmark_json_and_the_readme(name):
    evidence = EVIDENCE[name]
    document = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
    assert document["protocol"].strip(), "the JSON carries the protocol it followed"
    outcomes = []
    for key, scale in {**evidence.intervals, **evidence.context}.items():
        interval = document["intervals"][key]
        quoted = format_interval(interval["mean"], interval["low"], interval["high"], scale)
        assert quoted in evidence.summary, f"{name}: the summary must quote {key} as {quoted}"
        if key in evidence.intervals:
            outcomes.append(interval["verdict"] == "better")
    assert evidence.verdict == _verdict(outcomes)
    assert _flat(evidence.summary) in _flat((ROOT / "README.md").read_text()), (
        f"README.md must quote the evidence of {name} verbatim"
    )


FAKE = Evidence(
    benchmark="fake_method",
    methods=("fake-method",),
    claim="fake is better.",
    verdict="not reproduced",
    intervals={"a-b:accuracy": 100.0},
    summary="fake − baseline −0.4 [−1.0, +0.2] points.",
)


def test_card_and_demo_carry_the_evidence_and_only_for_their_method(monkeypatch):
    monkeypatch.setitem(evidence_module.EVIDENCE, "fake_method", FAKE)
    assert evidence_for("fake-method") is FAKE and evidence_for("fake_method") is FAKE
    card = str(build_model_card("fake-method", "A paper", extra_text="Trained here."))
    assert "Trained here." in card and FAKE.summary in card and "Not reproduced" in card
    assert FAKE.summary not in str(build_model_card("other-method", "A paper"))
    assert FAKE.summary in format_evidence(["fake_method", "example"])
    assert format_evidence(["example"]) == ""


def test_an_unknown_verdict_is_refused():
    with pytest.raises(ValueError, match="verdict"):
        Evidence("x", ("x",), "c", "maybe", {}, "s")


def test_interval_format():
    assert format_interval(0.0123, -0.001, 0.0256, 100) == "+1.2 [-0.1, +2.6]"
    assert format_interval(-0.0123, -0.02, -0.001, 1) == "-0.012 [-0.020, -0.001]"

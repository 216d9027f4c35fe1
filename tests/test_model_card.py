"""Model cards record method, paper, hyper-parameters and metrics exactly, offline."""

from __future__ import annotations

import enum
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from hf_extensions import __version__
from hf_extensions.hub import (
    build_model_card,
    check_model_card_method,
    read_model_card_metadata,
    save_model_card,
)


class Schedule(enum.Enum):
    COSINE = "cosine"


HYPERPARAMETERS = {
    "rho": 0.05,
    "learning_rate": 3e-4,
    "betas": (0.9, 0.999),
    "num_particles": np.int64(4),
    "weight": np.float32(0.5),
    "schedule": Schedule.COSINE,
    "adaptive": True,
    "warmup": None,
    "layers": {"query": [0, 1], "note": "a|b"},
}
# What the card must hold for HYPERPARAMETERS: plain YAML types, values unchanged.
RECORDED = {
    "rho": 0.05,
    "learning_rate": 3e-4,
    "betas": [0.9, 0.999],
    "num_particles": 4,
    "weight": 0.5,
    "schedule": "cosine",
    "adaptive": True,
    "warmup": None,
    "layers": {"query": [0, 1], "note": "a|b"},
}
METRICS = {"accuracy": 0.9125, "ece": 0.031, "nll": 0.27}


def _card(**overrides) -> ModelCard:
    kwargs = {
        "method": "agnostic-sam",
        "paper": "Agnostic Sharpness-Aware Minimization",
        "arxiv_id": "2406.07107",
        "hyperparameters": HYPERPARAMETERS,
        "metrics": METRICS,
        "base_model": "google/vit-base-patch16-224",
        "library_name": "transformers",
        "tags": ["image-classification"],
        "datasets": ["digits"],
        **overrides,
    }
    return build_model_card(**kwargs)


def _front_matter(text: str) -> dict:
    _, yaml_block, _ = text.split("---\n", 2)
    return yaml.safe_load(yaml_block)


def test_yaml_metadata_records_everything_exactly():
    metadata = _front_matter(str(_card()))
    record = metadata["hf_extensions"]
    assert record["method"] == "agnostic-sam"
    assert record["paper"] == "Agnostic Sharpness-Aware Minimization"
    assert record["arxiv_id"] == "2406.07107"
    assert record["paper_url"] == "https://arxiv.org/abs/2406.07107"
    assert record["version"] == __version__
    assert record["hyperparameters"] == RECORDED
    assert type(record["hyperparameters"]["num_particles"]) is int
    assert record["metrics"] == METRICS
    assert metadata["library_name"] == "transformers"
    assert metadata["base_model"] == "google/vit-base-patch16-224"
    assert metadata["datasets"] == ["digits"]
    assert metadata["tags"] == [
        "hf-extensions",
        "agnostic-sam",
        "image-classification",
        "arxiv:2406.07107",
    ]


def test_body_has_hyperparameter_and_metric_tables():
    text = _card(extra_text="## Notes\n\nTrained on 2 CPUs.").text
    assert "| hyper-parameter | value |" in text
    assert "| rho | 0.05 |" in text
    assert "| betas | [0.9, 0.999] |" in text
    assert '| layers | {"query": [0, 1], "note": "a\\|b"} |' in text  # pipes escaped
    assert "| accuracy | 0.9125 |" in text
    assert "[paper](https://arxiv.org/abs/2406.07107)" in text
    assert "`google/vit-base-patch16-224`" in text
    assert text.rstrip().endswith("Trained on 2 CPUs.")
    assert "## Measured metrics" not in _card(metrics=None).text


def test_round_trip_through_file(tmp_path):
    card = _card(library_name="peft")
    path = save_model_card(card, tmp_path / "adapter")
    assert path == tmp_path / "adapter" / "README.md"
    for source in (path, path.parent, card):
        metadata = read_model_card_metadata(source)
        assert metadata["method"] == "agnostic-sam"
        assert metadata["hyperparameters"] == RECORDED
        assert metadata["metrics"] == METRICS
        assert metadata["library_name"] == "peft"
        assert metadata["base_model"] == "google/vit-base-patch16-224"
    assert str(ModelCard.load(path)) == str(card)


def test_model_index_when_task_named():
    card = _card(task_type="image-classification")
    reloaded = ModelCard(str(card))
    results = {r.metric_type: r for r in reloaded.data.eval_results}
    assert set(results) == set(METRICS)
    assert results["accuracy"].metric_value == 0.9125
    assert results["accuracy"].dataset_name == "digits"
    assert results["accuracy"].task_type == "image-classification"
    assert "model-index" in _front_matter(str(card))
    assert "model-index" not in _front_matter(str(_card()))


def test_paper_url_gives_arxiv_id():
    record = read_model_card_metadata(
        _card(arxiv_id=None, paper_url="https://arxiv.org/pdf/2010.01412v3")
    )
    assert record["arxiv_id"] == "2010.01412v3"
    assert "arxiv:2010.01412v3" in record["tags"]
    plain = read_model_card_metadata(_card(arxiv_id=None, paper_url="https://openreview.net/x"))
    assert plain["arxiv_id"] is None and plain["paper_url"] == "https://openreview.net/x"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"method": "Agnostic SAM"}, r"^`method` must be"),
        ({"paper": ""}, r"^`paper` must be"),
        ({"library_name": "timm"}, r"^`library_name` must be one of"),
        ({"metrics": {"accuracy": "high"}}, "metrics.accuracy"),
        ({"hyperparameters": {"init": torch.zeros(3)}}, "hyperparameters.init"),
        ({"hyperparameters": {"dtype": torch.float16}}, "hyperparameters.dtype"),
        ({"task_type": "image-classification", "datasets": []}, r"^`task_type` must be"),
        ({"arxiv_id": "not-an-id"}, r"^`arxiv_id` must be an arXiv identifier"),
        (
            {"paper_url": "https://arxiv.org/abs/2010.01412"},
            r"^`arxiv_id` must be the id in paper_url",
        ),
    ],
)
def test_bad_values_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        _card(**overrides)


def test_check_method_refuses_other_methods(tmp_path):
    save_model_card(_card(), tmp_path)
    assert check_model_card_method(tmp_path, "agnostic-sam")["hyperparameters"] == RECORDED
    with pytest.raises(ValueError, match=r"'agnostic-sam'.*not 'sam'"):
        check_model_card_method(tmp_path, "sam")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "README.md").write_text("---\nlibrary_name: transformers\n---\n\n# Some model\n")
    with pytest.raises(ValueError, match="not written by hf-extensions"):
        read_model_card_metadata(foreign)
    with pytest.raises(FileNotFoundError):
        read_model_card_metadata(tmp_path / "missing")


def test_no_network_is_touched(tmp_path):
    boom = mock.Mock(side_effect=AssertionError("network used"))
    with (
        mock.patch("huggingface_hub.repocard.get_session", boom),
        mock.patch("huggingface_hub.hf_api.get_session", boom),
    ):
        path = save_model_card(_card(task_type="image-classification"), tmp_path)
        read_model_card_metadata(Path(path))
    boom.assert_not_called()

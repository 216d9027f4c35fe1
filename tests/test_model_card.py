"""Model cards record method, paper, hyper-parameters and metrics exactly, offline."""

from __future__ import annotations

import enum
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from hf_extensions import __version__
from hf_extensions.evidence import evidence_for
from hf_extensions.hub import (
    ARTIFACT_PLACEHOLDER,
    USAGES,
    Usage,
    build_model_card,
    check_model_card_method,
    local_folder,
    read_model_card_metadata,
    save_model_card,
    usage_for,
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
    # extra_text ends the body, followed only by the method's benchmark evidence
    evidence = evidence_for("agnostic-sam").markdown().rstrip()
    assert text.rstrip().endswith("Trained on 2 CPUs.\n\n" + evidence)
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


# ----------------------------------------------------------------------------- metrics, usage


def test_run_figures_are_not_metrics_and_the_table_is_rounded():
    """Trainer's timings, throughput and FLOs describe the run, not the model: they are not
    recorded; measured values are exact in the metadata and 4 significant digits on the page."""
    metrics = {
        "test_accuracy": 0.912345678,
        "test_nll": 0.0000246913578,
        "test_runtime": 1.5,
        "train_samples_per_second": 812.3,
        "eval_steps_per_second": 3.1,
        "total_flos": 12345.0,
    }
    card = _card(metrics=metrics, task_type="image-classification")
    assert read_model_card_metadata(card)["metrics"] == {
        "test_accuracy": 0.912345678,
        "test_nll": 0.0000246913578,
    }
    assert "| test_accuracy | 0.9123 |" in card.text and "| test_nll | 2.469e-05 |" in card.text
    for figure in ("runtime", "samples_per_second", "steps_per_second", "flos"):
        assert figure not in str(card)
    values = {r.metric_type: r.metric_value for r in ModelCard(str(card)).data.eval_results}
    assert values == {"test_accuracy": 0.9123, "test_nll": 2.469e-05}


def _python_blocks(card: ModelCard) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card.text, re.DOTALL)


def test_every_card_has_a_usage_snippet():
    # a method of the USAGES table: its snippet, for the artifact named
    (code,) = _python_blocks(_card(artifact="user/sam-vit"))
    assert 'pipeline("image-classification", model="user/sam-vit")' in code
    (code,) = _python_blocks(_card())  # the writer did not say where the artifact is
    assert f'model="{ARTIFACT_PLACEHOLDER}"' in code
    # a recipe's own snippet, as given
    usage = Usage(imports=("import torch",), load=("x = torch.ones(1)",), run=("print(x)",))
    assert _python_blocks(_card(usage=usage)) == ["import torch\n\nx = torch.ones(1)\nprint(x)\n"]
    # any other method: the library's generic loader
    for library, loader in [("transformers", "AutoModel"), ("peft", "AutoPeftModel"),
                            ("diffusers", "DiffusionPipeline")]:  # fmt: skip
        (code,) = _python_blocks(_card(method="other", library_name=library, artifact="u/m"))
        assert f'{loader}.from_pretrained("u/m")' in code
    with pytest.raises(ValueError, match="usage"):
        _card(usage="  ")
    with pytest.raises(ValueError, match="usage"):
        _card(usage=3)
    with pytest.raises(ValueError, match="method"):
        usage_for("no-such-method", "u/m")


def test_usage_one_line_keeps_the_imports_that_loading_needs():
    usage = Usage(
        imports=(
            "import torch",
            "from transformers import AutoModel, pipeline",
            "import peft_configs  # noqa: F401  (registers the method)",
        ),
        load=("# the weights", "model = AutoModel.from_pretrained('x')  # any folder"),
        run=("print(torch.ones(1))",),
    )
    assert usage.one_line == (
        "from transformers import AutoModel, pipeline; import peft_configs; "
        "model = AutoModel.from_pretrained('x')"
    )
    assert usage.code.splitlines()[:4] == [*usage.imports, ""]


def test_every_tabled_usage_names_its_artifact_and_base():
    for method in USAGES:
        usage = usage_for(method, "user/artifact", base_model="org/base")
        assert '"user/artifact"' in usage.code and usage.load and usage.run, method
        compile(usage.code, method, "exec")  # valid Python
        compile(usage.one_line, method, "exec")
    assert "org/base" in usage_for("eap-concept-erasure", "a", "org/base").code
    assert "tiny_stable_diffusion_pipeline()" in usage_for("eap-concept-erasure", "a").code


def test_local_folder_downloads_only_hub_ids(tmp_path):
    assert local_folder(tmp_path) == str(tmp_path)
    with mock.patch("huggingface_hub.snapshot_download", return_value="/cache/x") as download:
        assert local_folder("user/model", revision="v1") == "/cache/x"
    download.assert_called_once_with("user/model", revision="v1")

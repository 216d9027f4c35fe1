"""Model cards that record which method, which hyper-parameters and which measured figures.

Every artifact the project saves or pushes (a ``Trainer`` output, a PEFT adapter, an edited
diffusers pipeline, a quantized model) carries a ``README.md`` built here. Its YAML metadata
holds the standard Hub fields (``library_name``, ``base_model``, ``tags``, ``datasets``, and a
``model-index`` when a task is named) plus one ``hf_extensions`` block::

    hf_extensions:
      version: 0.1.0
      method: agnostic-sam
      paper: Agnostic Sharpness-Aware Minimization
      paper_url: https://arxiv.org/abs/...
      hyperparameters: {rho: 0.05, ...}
      metrics: {accuracy: 0.91, ...}

so that :func:`read_model_card_metadata` can read it back and :func:`check_model_card_method`
can refuse a checkpoint of another method. The body holds a hyper-parameter table, the measured
metrics (rounded to 4 significant digits; timings and throughput are not metrics of the model and
are left out) and a **usage snippet**: Python code that loads the artifact and runs it
(:class:`Usage`; :data:`USAGES` holds the one of each method whose artifact is written by a
trainer or a pipeline function). Nothing here touches the network: ``ModelCard.from_template``
renders locally and remote validation is never called.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hf_extensions import __version__
from hf_extensions.evidence import evidence_for
from hf_extensions.validation import check_choice, refuse

__all__ = [
    "LIBRARY_NAMES",
    "METADATA_KEY",
    "USAGES",
    "Usage",
    "build_model_card",
    "check_model_card_method",
    "local_folder",
    "measured_metrics",
    "read_model_card_metadata",
    "save_model_card",
    "usage_for",
]

METADATA_KEY = "hf_extensions"
LIBRARY_NAMES = ("transformers", "peft", "diffusers")
PROJECT_TAG = "hf-extensions"

_METHOD_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_ARXIV_ID_PATTERN = re.compile(r"^(\d{4}\.\d{4,5}|[a-z-]+(\.[A-Z]{2})?/\d{7})(v\d+)?$")
_ARXIV_URL_PATTERN = re.compile(r"arxiv\.org/(?:abs|pdf)/([^\s?#]+?)(?:\.pdf)?$")

_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

This `{{ library_name }}` artifact was produced with the **{{ method }}** method of
[hf-extensions](https://github.com/hf-extensions/hf-extensions) (version {{ version }}){% if paper %},
which implements *{{ paper }}*{% if paper_url %} ([paper]({{ paper_url }})){% endif %}{% endif %}.
{% if base_model %}
It was trained from the base model `{{ base_model }}`.
{% endif %}
## Hyper-parameters

{{ hyperparameter_table }}
{% if metric_table %}
## Measured metrics

{{ metric_table }}
{% endif %}
## Usage

```python
{{ usage }}
```
{% if extra_text %}
{{ extra_text }}
{% endif %}"""


def _to_yaml_value(value: Any, where: str) -> Any:
    """Convert ``value`` to plain YAML types (lists, dicts, scalars) or refuse it.

    Tuples become lists, numpy scalars Python numbers, enums their value and paths strings, so
    that what is read back equals what was recorded. Anything else (a tensor, a module, a dtype)
    is refused: a card must not silently hold ``repr`` strings where numbers were meant.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return _to_yaml_value(value.value, where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / torch scalar
        return _to_yaml_value(value.item(), where)
    if isinstance(value, (list, tuple)):
        return [_to_yaml_value(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, Mapping):
        if not all(isinstance(key, str) for key in value):
            refuse(where, "a mapping with string keys", list(value))
        return {key: _to_yaml_value(item, f"{where}.{key}") for key, item in value.items()}
    refuse(
        where,
        "None, a bool, int, float, str, enum, path, numpy scalar or a list/tuple/dict of those "
        f"(not a {type(value).__name__})",
        value,
    )


def _resolve_paper_links(
    paper_url: str | None, arxiv_id: str | None
) -> tuple[str | None, str | None]:
    """Fill in the paper URL from an arXiv id and the arXiv id from an arXiv URL."""
    if arxiv_id is not None and not _ARXIV_ID_PATTERN.match(arxiv_id):
        refuse("arxiv_id", "an arXiv identifier like '2010.01412'", arxiv_id)
    if paper_url is not None:
        found = _ARXIV_URL_PATTERN.search(paper_url)
        if found and _ARXIV_ID_PATTERN.match(found.group(1)):
            if arxiv_id is not None and arxiv_id != found.group(1):
                refuse("arxiv_id", f"the id in paper_url={paper_url!r} (or None)", arxiv_id)
            arxiv_id = found.group(1)
    elif arxiv_id is not None:
        paper_url = f"https://arxiv.org/abs/{arxiv_id}"
    return paper_url, arxiv_id


#: Suffixes of the figures a run logs that describe the run, not the model (Trainer's
#: ``*_runtime``, ``*_samples_per_second``, ``*_steps_per_second``, ``total_flos``): never
#: recorded as measured metrics.
NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "flos")
#: Significant digits of the values in the card's metric table and model-index.
METRIC_DIGITS = 4
#: Stands in for the artifact in a usage snippet when the card's writer does not know it.
ARTIFACT_PLACEHOLDER = "path/or/hub-id/of/this/model"


def measured_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """``metrics`` without the timings and throughput of the run (:data:`NOT_METRICS`)."""
    return {
        name: value
        for name, value in (metrics or {}).items()
        if not str(name).endswith(NOT_METRICS)
    }


def _rounded(value: float) -> float:
    """``value`` to :data:`METRIC_DIGITS` significant digits (non-finite values unchanged)."""
    if isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value):
        return value
    return float(f"{value:.{METRIC_DIGITS}g}")


def local_folder(path_or_repo_id: str | os.PathLike, **download_options: Any) -> str:
    """A local folder holding the artifact: ``path_or_repo_id`` itself when it is a folder,
    else the downloaded snapshot of that Hub repository (``huggingface_hub.snapshot_download``).

    For the loaders that read files (``ParticleEnsemble.from_pretrained``, ``load_erased``, ...)
    in usage snippets that must work for a Hub id and a local folder alike.
    """
    if os.path.isdir(path_or_repo_id):
        return os.fspath(path_or_repo_id)
    from huggingface_hub import snapshot_download

    return snapshot_download(str(path_or_repo_id), **download_options)


@dataclass(frozen=True)
class Usage:
    """A usage snippet: the imports, the lines that load the artifact, the lines that run it.

    :attr:`code` is the card's Python block; :attr:`one_line` (imports and loading joined by
    ``"; "``) is what a recipe prints at the end of a run.
    """

    imports: tuple[str, ...]
    load: tuple[str, ...]
    run: tuple[str, ...] = ()

    @property
    def code(self) -> str:
        return "\n".join([*self.imports, "", *self.load, *self.run])

    @property
    def one_line(self) -> str:
        """The loading lines with the imports they use (and side-effect imports), one line."""
        loading = " ".join(self.load)
        needed = [
            line
            for line in self.imports
            if "noqa: F401" in line
            or any(
                re.search(rf"\b{re.escape(name.split(' as ')[-1].strip())}\b", loading)
                for name in line.split(" import ", 1)[-1].removeprefix("import ").split(",")
            )
        ]
        statements = [line.split("  #")[0] for line in (*needed, *self.load)]
        return "; ".join(line for line in statements if not line.startswith("#"))


def _q(value: str | None) -> str:
    """A Python string literal (double quotes, as ruff formats them)."""
    return json.dumps(value)


def image_classifier_usage(artifact: str, base_model: str | None = None) -> Usage:
    """A ``transformers`` image classifier saved with its image processor and label names."""
    del base_model
    return Usage(
        imports=("from PIL import Image", "from transformers import pipeline"),
        load=(f'classifier = pipeline("image-classification", model={_q(artifact)})',),
        run=('print(classifier(Image.new("RGB", (64, 64), "white")))',),
    )


#: Two random images of the input shape of a ``transformers`` vision config ``config``.
_RANDOM_IMAGES = (
    'size = getattr(config, "image_size", 224)',
    "pixel_values = torch.rand(2, config.num_channels, size, size)",
)


def _particle_ensemble_usage(artifact: str, base_model: str | None = None) -> Usage:
    del base_model
    return Usage(
        imports=(
            "import torch",
            "from transformers import AutoModelForImageClassification",
            "from hf_extensions.fhbi.particles import ParticleEnsemble",
            "from hf_extensions.hub import local_folder",
        ),
        load=(
            f"folder = local_folder({_q(artifact)})",
            'base = AutoModelForImageClassification.from_pretrained(f"{folder}/base_model")',
            "ensemble = ParticleEnsemble.from_pretrained(base, folder).eval()",
        ),
        run=(
            "config = base.config",
            *_RANDOM_IMAGES,
            "with torch.no_grad():",
            '    print(ensemble(pixel_values=pixel_values)["logits"].exp())  # particle average',
        ),
    )


def _peer_ensemble_usage(artifact: str, base_model: str | None = None) -> Usage:
    del base_model
    return Usage(
        imports=(
            "import torch",
            "from hf_extensions.bnn import PeerEnsemble",
            "from hf_extensions.hub import local_folder",
        ),
        load=(f"peers = PeerEnsemble.from_pretrained(local_folder({_q(artifact)})).eval()",),
        run=(
            "config = peers.peers[0].config",
            *_RANDOM_IMAGES,
            "with torch.no_grad():",
            "    print(peers(pixel_values=pixel_values).logits.exp())  # Bayesian model average",
        ),
    )


def _hierarchical_cl_usage(artifact: str, base_model: str | None = None) -> Usage:
    del base_model
    return Usage(
        imports=(
            "import torch",
            "from datasets import Dataset",
            "from peft import PeftModel",
            "from transformers import AutoModelForImageClassification",
            "import peft_configs  # noqa: F401  (registers the prompt pool with PEFT)",
            "from hf_extensions.hub import local_folder",
            "from trainers import HierarchicalPromptCLConfig, HierarchicalPromptCLTrainer",
        ),
        load=(
            f"folder = local_folder({_q(artifact)})",
            'base = AutoModelForImageClassification.from_pretrained(f"{folder}/base_model")',
            "model = PeftModel.from_pretrained(base, folder)",
            "learner = HierarchicalPromptCLTrainer(model, HierarchicalPromptCLConfig(output_dir=folder))",
            "learner.load_continual_state(folder)  # task-identity head, class mixtures, taxonomy",
        ),
        run=(
            "config = base.config",
            *_RANDOM_IMAGES,
            'images = Dataset.from_dict({"pixel_values": pixel_values.numpy(), "labels": [0, 0]})',
            'print(learner.predict_classes(images.with_format("torch"))["predictions"])',
        ),
    )


def _pga_usage(artifact: str, base_model: str | None = None) -> Usage:
    del base_model
    return Usage(
        imports=(
            "import json",
            "import torch",
            "from safetensors.torch import load_file",
            "from transformers import AutoTokenizer, CLIPModel",
            "from hf_extensions.hub import local_folder",
            "from hf_extensions.pga.clip_prompts import CLIPPromptLearner",
        ),
        load=(
            f"folder = local_folder({_q(artifact)})",
            'clip = CLIPModel.from_pretrained(f"{folder}/base_model")',
            'tokenizer = AutoTokenizer.from_pretrained(f"{folder}/base_model")',
            'settings = json.loads(open(f"{folder}/prompt_learner.json").read())',
            "learner = CLIPPromptLearner(clip, tokenizer, **settings)",
            'learner.load_state_dict(load_file(f"{folder}/model.safetensors"))',
        ),
        run=(
            "config = clip.config.vision_config",
            *_RANDOM_IMAGES,
            "with torch.no_grad():",
            '    print(learner.eval()(pixel_values=pixel_values)["logits"].exp())  # averaged over domains',
        ),
    )


def _erasure_usage(artifact: str, base_model: str | None = None) -> Usage:
    if base_model is None:  # the recipes' tiny offline pipeline (seeded: the same weights)
        imports = ("from hf_extensions.models import tiny_stable_diffusion_pipeline",)
        base = "tiny_stable_diffusion_pipeline()"
    else:
        imports, base = (), f"StableDiffusionPipeline.from_pretrained({_q(base_model)})"
    return Usage(
        imports=(
            "import os",
            "from diffusers import StableDiffusionPipeline",
            "from hf_extensions.hub import local_folder",
            "from hf_extensions.pipelines import load_erased",
            *imports,
        ),
        load=(
            f"folder = local_folder({_q(artifact)})",
            "# a whole pipeline loads as it is; only the erased tensors load onto the base",
            'full = os.path.isfile(os.path.join(folder, "model_index.json"))',
            f"pipe = StableDiffusionPipeline.from_pretrained(folder) if full else load_erased({base}, folder)",
        ),
        run=(
            'image = pipe("a photo of a dog", num_inference_steps=4).images[0]',
            "print(image.size)",
        ),
    )


#: The usage snippet of each method whose artifact a trainer or a pipeline function writes
#: (their cards are built without a recipe's help): method id -> ``(artifact, base_model) ->
#: Usage``. Recipes that build their own card pass ``usage=`` instead.
USAGES: dict[str, Any] = {
    "fine-tuning": image_classifier_usage,
    "sam": image_classifier_usage,
    "asam": image_classifier_usage,
    "agnostic-sam": image_classifier_usage,
    "fhbi": _particle_ensemble_usage,
    "bnn-mutual-learning": _peer_ensemble_usage,
    "hierarchical-prompt-cl": _hierarchical_cl_usage,
    "pga": _pga_usage,
    "eap-concept-erasure": _erasure_usage,
}


def usage_for(method: str, artifact: str | None = None, base_model: str | None = None) -> Usage:
    """The :data:`USAGES` snippet of ``method`` for ``artifact`` (a folder or Hub id)."""
    if method not in USAGES:
        refuse("method", f"one of {sorted(USAGES)} (or pass `usage=` to the card)", method)
    return USAGES[method](artifact or ARTIFACT_PLACEHOLDER, base_model)


def _markdown_table(rows: Mapping[str, Any], header: tuple[str, str]) -> str:
    """A two-column Markdown table; values as JSON (strings as they are), pipes escaped."""

    def cell(value: Any) -> str:
        text = value if isinstance(value, str) else json.dumps(value)
        return text.replace("|", "\\|")

    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {cell(key)} | {cell(value)} |" for key, value in rows.items()]
    return "\n".join(lines)


def build_model_card(
    method: str,
    paper: str | None,
    *,
    paper_url: str | None = None,
    arxiv_id: str | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    base_model: str | None = None,
    library_name: Literal["transformers", "peft", "diffusers"] = "transformers",
    tags: Sequence[str] = (),
    datasets: Sequence[str] = (),
    task_type: str | None = None,
    model_name: str | None = None,
    license: str | None = None,
    extra_text: str = "",
    usage: Usage | str | None = None,
    artifact: str | None = None,
) -> ModelCard:
    """Build the model card of an artifact produced by ``method``, offline.

    The YAML metadata holds the standard Hub fields and the ``hf_extensions`` record (module
    docstring); the body has a hyper-parameter table, a metric table when there are metrics,
    and ``extra_text``.

    Args:
        method (`str`):
            The method's identifier: lower case letters, digits, ``.``, ``_`` and ``-``, e.g.
            ``"agnostic-sam"``; also a tag.
        paper (`str` or `None`):
            The title of the paper the method implements; `None` for a method of no paper,
            such as plain fine-tuning in the example recipe.
        paper_url (`str`, *optional*, defaults to `None`):
            Where the paper is. An arXiv URL (``arxiv.org/abs/...`` or ``/pdf/...``) gives the
            arXiv id too.
        arxiv_id (`str`, *optional*, defaults to `None`):
            The paper's arXiv identifier (e.g. ``"2010.01412"``); gives the ``paper_url`` when
            none is given, and becomes an ``arxiv:<id>`` tag (the Hub links the paper from it).
        hyperparameters (`Mapping[str, Any]`, *optional*, defaults to `None`):
            The settings that define the run, recorded exactly (see :func:`_to_yaml_value` for
            the allowed types).
        metrics (`Mapping[str, float]`, *optional*, defaults to `None`):
            Measured figures, name -> number; timings and throughput (:data:`NOT_METRICS`) are
            dropped. Recorded exactly in the metadata, rounded to :data:`METRIC_DIGITS`
            significant digits in the table and, with ``task_type``, in a ``model-index`` (the
            finite ones).
        base_model (`str`, *optional*, defaults to `None`):
            The Hub id or path the artifact was trained from.
        library_name (`str`, *optional*, defaults to `"transformers"`):
            The library that loads the artifact: ``"transformers"``, ``"peft"`` or
            ``"diffusers"``.
        tags (`Sequence[str]`, *optional*, defaults to `()`):
            Extra Hub tags, after ``hf-extensions`` and ``method``.
        datasets (`Sequence[str]`, *optional*, defaults to `()`):
            The Hub ids of the datasets used; the first is the evaluation dataset of the
            ``model-index``.
        task_type (`str`, *optional*, defaults to `None`):
            The Hub task of the ``model-index`` (e.g. ``"image-classification"``); needs
            ``datasets``. `None`: no ``model-index``.
        model_name (`str`, *optional*, defaults to `None`):
            The card's title and ``model-index`` name; `None`: ``"<method> model"``.
        license (`str`, *optional*, defaults to `None`):
            The Hub license identifier (e.g. ``"apache-2.0"``).
        extra_text (`str`, *optional*, defaults to `""`):
            Markdown appended to the body, before the method's benchmark evidence
            (:mod:`hf_extensions.evidence`, when it has some).
        usage (`Usage` or `str`, *optional*, defaults to `None`):
            The card's usage snippet (Python code that loads the artifact and runs it); `None`:
            the :data:`USAGES` snippet of ``method``, else a generic loader of ``library_name``.
        artifact (`str`, *optional*, defaults to `None`):
            The Hub id or folder the default snippet loads; `None`:
            :data:`ARTIFACT_PLACEHOLDER`.

    Returns:
        `huggingface_hub.ModelCard`: the card; save it with :func:`save_model_card`.

    Raises:
        ValueError: for a malformed method name, an empty ``paper``, an unknown library, a
            malformed ``arxiv_id`` or one that disagrees with ``paper_url``, unknown value
            types, non-numeric metrics, or ``task_type`` without ``datasets``.
    """
    if not isinstance(method, str) or not _METHOD_PATTERN.match(method):
        refuse(
            "method",
            "a lower-case identifier such as 'agnostic-sam' (letters, digits, '.', '_', '-')",
            method,
        )
    if paper is not None and (not paper or not isinstance(paper, str)):
        refuse("paper", "the non-empty title of the paper, or None", paper)
    check_choice("library_name", library_name, LIBRARY_NAMES)
    paper_url, arxiv_id = _resolve_paper_links(paper_url, arxiv_id)
    hyperparameters = _to_yaml_value(dict(hyperparameters or {}), "hyperparameters")
    metrics = _to_yaml_value(measured_metrics(metrics), "metrics")
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            refuse(f"metrics.{name}", "a number", value)
    if task_type is not None and not datasets:
        refuse("task_type", "None unless `datasets` names the evaluation dataset", task_type)

    model_name = model_name or f"{method} model"
    eval_results = None
    if task_type is not None and metrics:
        eval_results = [
            EvalResult(
                task_type=task_type,
                dataset_type=datasets[0],
                dataset_name=datasets[0],
                metric_type=name,
                metric_value=_rounded(value),
            )
            for name, value in metrics.items()
            if math.isfinite(value)
        ] or None
    all_tags = [PROJECT_TAG, method, *tags]
    if arxiv_id is not None:
        all_tags.append(f"arxiv:{arxiv_id}")
    record = {
        "version": __version__,
        "method": method,
        "paper": paper,
        "paper_url": paper_url,
        "arxiv_id": arxiv_id,
        "hyperparameters": hyperparameters,
        "metrics": metrics,
    }
    card_data = ModelCardData(
        library_name=library_name,
        base_model=base_model,
        license=license,
        tags=all_tags,
        datasets=list(datasets) or None,
        model_name=model_name,
        eval_results=eval_results,
        **{METADATA_KEY: record},
    )
    return ModelCard.from_template(
        card_data,
        template_str=_TEMPLATE,
        title=model_name,
        library_name=library_name,
        method=method,
        version=__version__,
        paper=paper,
        paper_url=paper_url,
        base_model=base_model,
        hyperparameter_table=_markdown_table(hyperparameters, ("hyper-parameter", "value")),
        metric_table=_markdown_table(
            {name: _rounded(value) for name, value in metrics.items()}, ("metric", "value")
        )
        if metrics
        else "",
        usage=_usage_code(usage, method, library_name, artifact, base_model),
        extra_text=_with_evidence(extra_text, method),
    )


def _with_evidence(extra_text: str, method: str) -> str:
    """``extra_text`` followed by the method's benchmark evidence (:mod:`hf_extensions.evidence`)."""
    evidence = evidence_for(method)
    if evidence is None:
        return extra_text
    return f"{extra_text}\n\n{evidence.markdown()}" if extra_text else evidence.markdown()


_GENERIC_LOADERS = {
    "transformers": ("from transformers import AutoModel", "model = AutoModel.from_pretrained"),
    "peft": ("from peft import AutoPeftModel", "model = AutoPeftModel.from_pretrained"),
    "diffusers": (
        "from diffusers import DiffusionPipeline",
        "pipe = DiffusionPipeline.from_pretrained",
    ),
}


def _usage_code(
    usage: Usage | str | None,
    method: str,
    library_name: str,
    artifact: str | None,
    base_model: str | None,
) -> str:
    """The code of the card's usage block (see :func:`build_model_card`)."""
    if isinstance(usage, Usage):
        return usage.code
    if isinstance(usage, str):
        if not usage.strip():
            refuse("usage", "Python code that loads the artifact (or None)", usage)
        return usage.strip("\n")
    if usage is not None:
        refuse("usage", "a Usage, a string of Python code or None", usage)
    if method in USAGES:
        return usage_for(method, artifact, base_model).code
    importer, loader = _GENERIC_LOADERS[library_name]
    return f"{importer}\n\n{loader}({_q(artifact or ARTIFACT_PLACEHOLDER)})"


def save_model_card(card: ModelCard, directory: str | os.PathLike) -> Path:
    """Write ``card`` as ``directory/README.md`` (creating the directory); return the path.

    Atomic (a temporary file, then ``os.replace``): a reader sees the old card or the new one."""
    from hf_extensions.atomic import atomic_write_text

    return atomic_write_text(Path(directory) / "README.md", str(card))


def read_model_card_metadata(source: str | os.PathLike | ModelCard) -> dict[str, Any]:
    """Read back what :func:`build_model_card` recorded.

    ``source`` is a card, a ``README.md`` path or a directory holding one (local only: a Hub
    artifact is downloaded first, then read). Returns the ``hf_extensions`` record (``method``,
    ``paper``, ``paper_url``, ``arxiv_id``, ``version``, ``hyperparameters``, ``metrics``) plus
    ``library_name``, ``base_model``, ``tags`` and ``datasets`` from the standard fields.

    Raises:
        FileNotFoundError: no README.md at ``source``.
        ValueError: the card has no ``hf_extensions`` record (it was not written by this project).
    """
    if isinstance(source, ModelCard):
        card, where = source, "the given card"
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "README.md"
        if not path.is_file():
            raise FileNotFoundError(f"No model card (README.md) at {path}.")
        card, where = ModelCard.load(path), str(path)
    data = card.data.to_dict()
    record = data.get(METADATA_KEY)
    if not isinstance(record, dict) or "method" not in record:
        raise ValueError(
            f"The model card at {where} has no '{METADATA_KEY}' metadata: it was not written by "
            "hf-extensions, so its method and hyper-parameters are unknown."
        )
    return {
        **record,
        "library_name": data.get("library_name"),
        "base_model": data.get("base_model"),
        "tags": data.get("tags", []),
        "datasets": data.get("datasets", []),
    }


def check_model_card_method(source: str | os.PathLike | ModelCard, method: str) -> dict[str, Any]:
    """Refuse an artifact produced by another method; return its metadata when it matches.

    Raises:
        ValueError: the card records a different method (or none).
    """
    metadata = read_model_card_metadata(source)
    if metadata["method"] != method:
        raise ValueError(
            f"This artifact was produced by method {metadata['method']!r} (hf-extensions "
            f"{metadata.get('version')}), not {method!r}; load it with the matching class."
        )
    return metadata

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
can refuse a checkpoint of another method. Nothing here touches the network:
``ModelCard.from_template`` renders locally and remote validation is never called.
"""

from __future__ import annotations

import enum
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hf_extensions import __version__
from hf_extensions.validation import check_choice, refuse

__all__ = [
    "LIBRARY_NAMES",
    "METADATA_KEY",
    "build_model_card",
    "check_model_card_method",
    "read_model_card_metadata",
    "save_model_card",
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
{% endif %}{% if extra_text %}
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
            Measured figures, name -> number. With ``task_type`` they also go into a
            ``model-index`` (the finite ones).
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
            Markdown appended to the body.

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
    metrics = _to_yaml_value(dict(metrics or {}), "metrics")
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
                metric_value=value,
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
        metric_table=_markdown_table(metrics, ("metric", "value")) if metrics else "",
        extra_text=extra_text,
    )


def save_model_card(card: ModelCard, directory: str | os.PathLike) -> Path:
    """Write ``card`` as ``directory/README.md`` (creating the directory); return the path."""
    path = Path(directory) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    card.save(path)
    return path


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

"""Save, reload and push an erased pipeline: the whole pipeline, or only the changed UNet tensors.

An erasure (:func:`hf_extensions.pipelines.erase_concepts`, Bui et al. 2024, arXiv 2410.15618)
changes one parameter group of the UNet and nothing else, so two artifacts make sense:

- ``only_changed=False``: ``pipe.save_pretrained(directory)``, loadable with
  ``DiffusionPipeline.from_pretrained`` and no hf-extensions code at all;
- ``only_changed=True``: ``unet_erasure.safetensors`` (the trained group's tensors, a few MB for
  ``xattn`` on SD v1.4 instead of 3.4 GB) and ``erasure_config.json``; apply them to the base
  pipeline with :func:`load_erased`, which validates the record like user input and refuses a
  tensor that is unknown, has another shape or lies outside the recorded parameter group.

Both carry a model card (``hf_extensions.hub``) with the erased concepts, the method variant,
the parameter group, the adversarial concepts the adversary found, and the measured drift.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hf_extensions import __version__
from hf_extensions.atomic import atomic_save, recover_interrupted_save
from hf_extensions.hub import build_model_card, check_model_card_method, save_model_card
from hf_extensions.loading import FIX, check_tensors, read_json, read_tensors
from hf_extensions.pipelines.config import METHODS, ErasureConfig
from hf_extensions.pipelines.erasure import ARXIV_ID, METHOD, PAPER, ErasureResult
from hf_extensions.pipelines.parameter_groups import in_group

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "build_erasure_card",
    "load_erased",
    "push_erased_to_hub",
    "save_erased",
]

WEIGHTS_NAME = "unet_erasure.safetensors"
CONFIG_NAME = "erasure_config.json"
_CARD_KEYS = (
    "parameter_group",
    "loss_space",
    "negative_guidance",
    "preservation_weight",
    "num_steps",
    "learning_rate",
    "ddim_steps",
    "start_guidance",
    "k_closest",
    "num_centers",
    "exclude_target",
    "gumbel_temperature",
    "gumbel_hard",
    "adversary_lr",
    "pgd_num_steps",
    "adversary_estimator",
    "adversary_reference",
    "seed",
)


def _result(pipe) -> ErasureResult:
    result = getattr(pipe, "erasure_result", None)
    if not isinstance(result, ErasureResult):
        raise ValueError(
            "This pipeline carries no `erasure_result`: erase concepts with "
            "`hf_extensions.pipelines.erase_concepts` first."
        )
    return result


def build_erasure_card(
    result: ErasureResult,
    base_model: str | None = None,
    metrics: Mapping[str, float] | None = None,
):
    """The model card of an erasure: concepts, group, adversarial concepts found, measured figures.

    Args:
        result (`ErasureResult`):
            What the erasure did (``pipe.erasure_result``): its method variant, concepts, config
            (the hyper-parameters recorded on the card), trained tensors and adversarial concepts.
        base_model (`str`, *optional*, defaults to `None`):
            The Hub id or path of the pipeline that was erased (the card's ``base_model``).
        metrics (`Mapping[str, float]`, *optional*, defaults to `None`):
            Measured figures (e.g. from :func:`hf_extensions.pipelines.evaluate_erasure`),
            added to ``result.metrics``; a name in both takes the value given here.

    Returns:
        `huggingface_hub.ModelCard`: the card (library ``diffusers``), built offline.
    """
    hyperparameters: dict[str, Any] = {
        "variant": result.method,
        "erased_concepts": list(result.concepts),
        **{key: result.config[key] for key in _CARD_KEYS},
    }
    if result.method == "fixed":
        hyperparameters["preserve_concepts"] = list(result.config["preserve_concepts"])
    if result.adversarial_concepts:
        hyperparameters["adversarial_concepts"] = {
            concept: found["argmax"] for concept, found in result.adversarial_concepts.items()
        }
    figures = {**result.metrics, **(metrics or {})}
    lines = [
        "## Erasure",
        "",
        f"Erased concepts: {', '.join(repr(c) for c in result.concepts)} "
        f"({result.method}, parameter group `{result.config['parameter_group']}`, "
        f"{len(result.trained_parameters)} tensors changed).",
    ]
    for concept, found in result.adversarial_concepts.items():
        lines.append(
            f"- adversarial concept for {concept!r}: **{found['argmax']}** (most chosen: "
            f"{', '.join(found['most_chosen'])})"
        )
    return build_model_card(
        method=METHOD,
        paper=PAPER,
        arxiv_id=ARXIV_ID,
        hyperparameters=hyperparameters,
        metrics={key: float(value) for key, value in figures.items()},
        base_model=base_model,
        library_name="diffusers",
        tags=["text-to-image", "stable-diffusion", "concept-erasure", result.method],
        extra_text="\n".join(lines),
    )


def save_erased(
    pipe,
    directory: str | os.PathLike,
    only_changed: bool = False,
    base_model: str | None = None,
    metrics: Mapping[str, float] | None = None,
) -> Path:
    """Save an erased pipeline, or only its changed UNet tensors, with a model card.

    Args:
        pipe (`StableDiffusionPipeline`):
            A pipeline returned by :func:`hf_extensions.pipelines.erase_concepts` (it carries
            ``pipe.erasure_result``).
        directory (`str` or `os.PathLike`):
            Where to save; created if missing.
        only_changed (`bool`, *optional*, defaults to `False`):
            `False`: ``pipe.save_pretrained(directory)``, loadable with
            ``DiffusionPipeline.from_pretrained`` alone. `True`: only the trained tensors
            (``unet_erasure.safetensors``) and the record (``erasure_config.json``), to apply to
            the base pipeline with :func:`load_erased`.
        base_model (`str`, *optional*, defaults to `None`):
            The Hub id or path of the pipeline that was erased, recorded in the card (and in the
            record with ``only_changed``).
        metrics (`Mapping[str, float]`, *optional*, defaults to `None`):
            Measured figures (e.g. from :func:`hf_extensions.pipelines.evaluate_erasure`),
            recorded in the card together with those already on ``pipe.erasure_result``.

    Returns:
        `pathlib.Path`: ``directory``.

    Raises:
        ValueError: ``pipe`` carries no ``erasure_result``.

    The save is all-or-nothing (:func:`hf_extensions.atomic.atomic_save`): a process killed
    mid-save leaves the previous artifact in ``directory`` or this one, never parts of both.
    """
    result = _result(pipe)
    directory = Path(directory)
    card = build_erasure_card(result, base_model, metrics)
    with atomic_save(directory) as stage:
        if only_changed:
            state = pipe.unet.state_dict()
            tensors = {
                # host: saving
                name: state[name].detach().contiguous().cpu()
                for name in result.trained_parameters
            }
            save_file(tensors, str(stage / WEIGHTS_NAME), metadata={"method": METHOD})
            record = {
                "method": METHOD,
                "version": __version__,
                "variant": result.method,
                "concepts": list(result.concepts),
                "base_model": base_model,
                "config": result.config,
                "adversarial_concepts": result.adversarial_concepts,
                "trained_parameters": list(result.trained_parameters),
            }
            (stage / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")
        else:
            pipe.save_pretrained(stage)
        save_model_card(card, stage)
    return directory


def load_erased(pipe, directory: str | os.PathLike):
    """Apply the changed tensors saved by ``save_erased(..., only_changed=True)`` to ``pipe``.

    For a full save use ``DiffusionPipeline.from_pretrained(directory)`` instead.

    Args:
        pipe (`StableDiffusionPipeline`):
            The base pipeline the erasure started from; its UNet is updated in place (each
            tensor cast to the parameter's dtype).
        directory (`str` or `os.PathLike`):
            A directory written by ``save_erased(..., only_changed=True)``: ``README.md``,
            ``erasure_config.json`` and ``unet_erasure.safetensors``.

    Returns:
        `StableDiffusionPipeline`: ``pipe``, with the loaded tensors and an ``erasure_result``
        rebuilt from the record (variant, concepts, config, adversarial concepts).

    Raises:
        FileNotFoundError: ``directory`` holds no ``erasure_config.json`` or no model card.
        ValueError: the record is validated like user input: the card or the record names
            another method, the variant is unknown, the config is invalid, or a tensor is not a
            parameter of ``pipe.unet``, lies outside the recorded parameter group, has another
            shape, is missing from the file or not in the record; each message names the file.

    An interrupted :func:`save_erased` is first finished or discarded
    (:func:`hf_extensions.atomic.recover_interrupted_save`), so the folder is read whole.
    """
    directory = Path(directory)
    recover_interrupted_save(directory)
    record_path, path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not record_path.is_file():
        raise FileNotFoundError(
            f"No {CONFIG_NAME} in {directory}: not an only-changed erasure artifact (a full save "
            "loads with DiffusionPipeline.from_pretrained)."
        )
    check_model_card_method(directory, METHOD)
    record = read_json(record_path)
    if record.get("method") != METHOD:
        raise ValueError(f"{record_path} records method {record.get('method')!r}, not {METHOD!r}.")
    if record.get("variant") not in METHODS:
        raise ValueError(
            f"{record_path}: variant must be one of {METHODS}, got {record.get('variant')!r}."
        )
    names = record.get("trained_parameters")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(
            f"{record_path} lacks the list `trained_parameters`: {FIX} (save_erased writes it)."
        )
    if not isinstance(record.get("config"), dict):
        raise ValueError(
            f"{record_path} lacks the mapping `config`: {FIX} (save_erased writes it)."
        )
    config = ErasureConfig(**record["config"])
    tensors = read_tensors(path)
    parameters = dict(pipe.unet.named_parameters())
    for name in sorted(set(names) | set(tensors)):
        if name not in parameters:
            raise ValueError(f"{path}: tensor {name!r} is not a parameter of this UNet: {FIX}.")
        if not in_group(name, config.parameter_group):
            raise ValueError(
                f"{path}: tensor {name!r} lies outside the recorded parameter group "
                f"{config.parameter_group!r}: {FIX}."
            )
    check_tensors(path, tensors, {name: parameters[name] for name in names})
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor.to(parameters[name].dtype))
    pipe.erasure_result = ErasureResult(
        method=record["variant"],
        concepts=list(record["concepts"]),
        config=config.to_dict(),
        trained_parameters=list(names),
        adversarial_concepts=dict(record.get("adversarial_concepts") or {}),
    )
    return pipe


def push_erased_to_hub(
    pipe,
    repo_id: str,
    only_changed: bool = False,
    base_model: str | None = None,
    metrics: Mapping[str, float] | None = None,
    private: bool | None = None,
    token: str | None = None,
) -> str:
    """Save as :func:`save_erased` does (with its card) and upload to ``repo_id``.

    The repository is created if it does not exist; the upload is one commit named after the
    erased concepts and the method variant.

    Args:
        pipe (`StableDiffusionPipeline`):
            A pipeline returned by :func:`hf_extensions.pipelines.erase_concepts`.
        repo_id (`str`):
            The Hub repository, ``"name"`` or ``"namespace/name"``.
        only_changed (`bool`, *optional*, defaults to `False`):
            Upload only the changed UNet tensors and their record instead of the whole pipeline
            (see :func:`save_erased`).
        base_model (`str`, *optional*, defaults to `None`):
            The Hub id or path of the pipeline that was erased, recorded in the card.
        metrics (`Mapping[str, float]`, *optional*, defaults to `None`):
            Measured figures recorded in the card (see :func:`save_erased`).
        private (`bool`, *optional*, defaults to `None`):
            Visibility of a repository that this call creates; `None`: the Hub's default.
        token (`str`, *optional*, defaults to `None`):
            Hub token; `None` uses the one ``huggingface_hub`` finds (login or ``HF_TOKEN``).

    Returns:
        `str`: the URL of the repository.

    Raises:
        ValueError: ``pipe`` carries no ``erasure_result``.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as folder:
        save_erased(pipe, folder, only_changed=only_changed, base_model=base_model, metrics=metrics)
        url = api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(
            repo_id=getattr(url, "repo_id", repo_id),
            folder_path=folder,
            commit_message=f"Erase {', '.join(_result(pipe).concepts)} ({_result(pipe).method})",
        )
    return str(url)

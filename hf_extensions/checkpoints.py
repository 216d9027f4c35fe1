"""Resuming from a checkpoint: the newest *complete* one, with the weights it really holds.

Incomplete checkpoints. ``Trainer._save_checkpoint`` (transformers 5.25) writes a
``checkpoint-N`` folder file by file: the model, the optimizer and scheduler, the RNG states, and
``trainer_state.json`` last (not atomically). A run killed mid-save leaves a folder without that
file, with a truncated one, or (another rank's) without its RNG file; a run killed while
``save_total_limit`` deletes an old folder leaves part of it. :func:`checkpoint_problem` says
what is wrong with a folder; :func:`resolve_checkpoint` (``resume_from_checkpoint=True`` /
``"last"``) skips incomplete folders with a warning naming each and why, and takes the newest
complete one; a folder named explicitly is refused when incomplete.

Renamed keys. transformers 5 writes a model's checkpoint in the original key format of its
architecture (``save_pretrained`` reverts the key renames that ``from_pretrained`` applies: a ViT
saves ``vit.encoder.layer.N...`` while its modules are ``vit.layers.N...``), but
``Trainer._load_from_checkpoint`` reads the file with a plain ``load_state_dict`` (transformers
issue #43701). Every key is then "missing" or "unexpected", the load is non-strict, and the
resumed run silently continues from the initial weights with only a warning.
:func:`restore_pretrained_weights` loads them through ``from_pretrained`` first; Trainer's own
load then changes nothing, and it still restores the optimizer, scheduler, RNG states and step.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel

from hf_extensions.atomic import recover_interrupted_save

__all__ = [
    "CHECKPOINT_PATTERN",
    "TRAINER_STATE",
    "checkpoint_problem",
    "last_complete_checkpoint",
    "resolve_checkpoint",
    "restore_pretrained_weights",
]

logger = logging.getLogger(__name__)

#: The folder names ``Trainer`` gives its checkpoints (``transformers.trainer_utils``'s rule).
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
#: Written last by ``Trainer._save_checkpoint``: its presence marks a finished save.
TRAINER_STATE = "trainer_state.json"
_WEIGHTS = re.compile(
    r"^((model|pytorch_model|adapter_model)([-.].+)?\.(safetensors|bin|json)|pytorch_model_fsdp.*)$"
)
_OPTIMIZER = re.compile(r"^(optimizer\.pt|optimizer_\d+|global_step\d+)$")  # plain, FSDP, DeepSpeed
_RANK_RNG = re.compile(r"^rng_state_(\d+)\.pth$")

#: ``problem(folder) -> None`` (complete) or a sentence saying what is missing.
Problem = Callable[[Path], "str | None"]


def _has_weights(folder: Path) -> bool:
    for entry in folder.iterdir():
        if _WEIGHTS.match(entry.name) or (
            entry.is_dir()
            and (  # DeepSpeed's folder; one folder per adapter / per particle
                entry.name.startswith("global_step")
                or any(_WEIGHTS.match(sub.name) for sub in entry.iterdir())
            )
        ):
            return True
    return False


def _rng_problem(folder: Path, world_size: int) -> str | None:
    ranks = sorted(int(m.group(1)) for e in folder.iterdir() if (m := _RANK_RNG.match(e.name)))
    if not ranks:
        return None if (folder / "rng_state.pth").is_file() else "it has no rng_state.pth"
    if world_size <= 1:  # saved by several processes, resumed by one: Trainer's own case
        return None
    for rank in range(world_size):
        path = folder / f"rng_state_{rank}.pth"
        if rank not in ranks:
            return f"it has no {path.name} (process {rank} had not written its RNG state)"
        try:  # another rank may still have been writing it when rank 0 wrote trainer_state.json
            torch.load(path, weights_only=True, map_location="cpu")
        except Exception as error:  # any failure means a file cut short
            return f"its {path.name} cannot be read ({type(error).__name__}: cut short)"
    return None


def checkpoint_problem(
    folder: str | Path, *, world_size: int = 1, model_only: bool = False
) -> str | None:
    """What makes the ``Trainer`` checkpoint ``folder`` unusable for an exact resume, or ``None``.

    Complete means: a ``trainer_state.json`` that parses and whose ``global_step`` is the ``N``
    of ``checkpoint-N`` (Trainer writes it last), model weights, and (unless ``model_only``:
    ``save_only_model``) the optimizer and the RNG state of each of ``world_size`` processes.
    """
    folder = Path(folder)
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"it has no {TRAINER_STATE} (Trainer writes it last: the save was cut short)"
    try:
        step = json.loads(state.read_text())["global_step"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"its {TRAINER_STATE} is not JSON with a global_step (cut short while written)"
    match = CHECKPOINT_PATTERN.match(folder.name)
    if match and step != int(match.group(1)):
        return f"its {TRAINER_STATE} is for global_step {step} (a mix of two saves)"
    if not _has_weights(folder):
        return "it holds no model weights"
    if model_only:
        return None
    if not any(_OPTIMIZER.match(entry.name) for entry in folder.iterdir()):
        return "it has no optimizer state (optimizer.pt)"
    return _rng_problem(folder, world_size)


def last_complete_checkpoint(directory: str | Path, problem: Problem | None = None) -> str | None:
    """The newest complete ``checkpoint-N`` folder of ``directory`` (``None`` if none); every
    newer incomplete one is skipped with a warning naming it and why. A save that
    :func:`hf_extensions.atomic.atomic_save` left unfinished is first recovered."""
    problem = problem or checkpoint_problem
    directory = Path(directory)
    if not directory.is_dir():
        return None
    recover_interrupted_save(directory)
    found = [
        (int(m.group(1)), e) for e in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(e.name))
    ]
    for _, folder in sorted(found, key=lambda item: item[0], reverse=True):
        if not folder.is_dir():
            continue
        reason = problem(folder)
        if reason is None:
            return str(folder)
        logger.warning(
            "Skipping the incomplete checkpoint %s: %s. Resuming from an earlier one.",
            folder,
            reason,
        )
    return None


def resolve_checkpoint(
    value: str | bool | None, output_dir: str, problem: Problem | None = None
) -> str | None:
    """The folder that ``resume_from_checkpoint`` names: ``None`` / ``False`` / ``""``: none;
    ``True`` or ``"true"`` / ``"last"``: the newest complete ``checkpoint-N`` of ``output_dir``
    (:func:`last_complete_checkpoint`); else the given folder. A missing or incomplete folder is
    refused, naming it and the fix. ``problem``: the completeness check (default
    :func:`checkpoint_problem`, a ``Trainer`` checkpoint saved by one process)."""
    problem = problem or checkpoint_problem
    if value is None or value is False or value == "":
        return None
    if value is True or str(value).lower() in ("true", "last"):
        path = last_complete_checkpoint(output_dir, problem)
        if path is None:
            raise ValueError(
                f"`resume_from_checkpoint={value}` but `output_dir` {output_dir} holds no "
                "checkpoint-N folder that is complete (incomplete ones are named in the warnings "
                "above); pass the checkpoint's path or train without the flag."
            )
        return path
    if not Path(value).is_dir():
        raise ValueError(
            f"`resume_from_checkpoint`: no checkpoint folder at {value}; pass an existing "
            "checkpoint-N folder, or `last` for the newest one in `output_dir`."
        )
    recover_interrupted_save(Path(value).parent)
    reason = problem(Path(value))
    if reason is not None:
        raise ValueError(
            f"`resume_from_checkpoint`: the checkpoint {value} is incomplete: {reason}. Resume from "
            "an earlier checkpoint-N, or pass `last` (the newest complete one)."
        )
    return str(value)


def restore_pretrained_weights(model: torch.nn.Module, checkpoint: str) -> bool:
    """Load ``checkpoint``'s weights into ``model`` through ``type(model).from_pretrained`` when
    ``model`` is a ``PreTrainedModel`` (returns whether it did); other modules (PEFT models,
    particle and peer ensembles) are left to Trainer, whose own load is right for them."""
    if not isinstance(model, PreTrainedModel):
        return False
    restored = type(model).from_pretrained(checkpoint)
    model.load_state_dict(restored.state_dict())
    return True

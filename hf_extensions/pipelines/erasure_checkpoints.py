"""Checkpoints of a concept erasure (:func:`hf_extensions.pipelines.erase_concepts`) and its
exact resume.

Every ``ErasureConfig.save_steps`` model steps the main process writes
``checkpoint_dir/checkpoint-N`` through :func:`hf_extensions.atomic.atomic_save` (a run killed
mid-save leaves the earlier checkpoints and no partial one), then removes all but the newest
``save_total_limit``. A checkpoint holds what the next step depends on:

- ``trained.safetensors``: the trained UNet tensors (the config's parameter group) and each
  adversary's logits;
- ``optimizer.pt``: the Adam states of the UNet and of the adversary, and the fp16 loss scaler's;
- ``eraser_state.json``: the step, the losses, the adversary's choice counts, and what must match
  to resume (method, concepts, candidate words, trained tensors, seed, global batch).

RNG: every cycle draws from a generator keyed on (seed, step, micro-cycle, rank)
(:meth:`ConceptEraser.cycle_generator`) and the loop uses no global random state, so restoring
the step restores every draw. ``losses`` and the choice counts are the main process's (each
process keeps its own; only the main process saves).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from hf_extensions.atomic import atomic_save
from hf_extensions.checkpoints import CHECKPOINT_PATTERN

# The functions take a ``hf_extensions.pipelines.erasure.ConceptEraser`` (typed ``Eraser`` here:
# importing it, even for type checking, would make the two modules a cycle).
Eraser = Any

__all__ = ["checkpoint_problem", "load_checkpoint", "save_checkpoint"]

FORMAT_VERSION = 1
STATE_NAME = "eraser_state.json"
TENSORS_NAME = "trained.safetensors"
OPTIMIZER_NAME = "optimizer.pt"


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """What makes an erasure checkpoint ``folder`` unusable, or ``None`` (complete)."""
    folder = Path(folder)
    try:
        step = json.loads((folder / STATE_NAME).read_text())["step"]
    except FileNotFoundError:
        return f"it has no {STATE_NAME} (not an erasure checkpoint)"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return f"its {STATE_NAME} is not JSON with a step"
    match = CHECKPOINT_PATTERN.match(folder.name)
    if match and step != int(match.group(1)):
        return f"its {STATE_NAME} is for step {step}"
    for name in (TENSORS_NAME, OPTIMIZER_NAME):
        if not (folder / name).is_file():
            return f"it has no {name}"
    return None


def _record(eraser: Eraser) -> dict:
    """What a checkpoint must agree with to be resumed by ``eraser``."""
    config, acc = eraser.config, eraser.accelerator
    return {
        "method": eraser.method,
        "concepts": list(eraser.concepts),
        "candidates": [list(a.candidates.words) for a in eraser.adversaries],
        "trained_parameters": sorted(eraser.trained_parameters),
        "seed": config.seed,
        "global_batch": config.gradient_accumulation_steps * acc.num_processes,
    }


def _write_checkpoint(eraser: Eraser, folder: Path) -> None:
    folder.mkdir()
    acc = eraser.accelerator
    trained = set(eraser.trained_parameters)
    unet = acc.unwrap_model(eraser.unet)
    tensors = {
        # host: saving
        f"unet.{name}": p.detach().cpu().contiguous()
        for name, p in unet.named_parameters()
        if name in trained
    }
    for index, adversary in enumerate(eraser.adversaries):
        # host: saving
        tensors[f"adversary.{index}.logits"] = adversary.logits.detach().cpu().contiguous()
    save_file(tensors, str(folder / TENSORS_NAME))
    optimizers = {
        "unet": eraser.optimizer.state_dict(),
        "adversary": None
        if eraser.adversary_optimizer is None
        else eraser.adversary_optimizer.state_dict(),
        "scaler": None if acc.scaler is None else acc.scaler.state_dict(),
    }
    torch.save(optimizers, folder / OPTIMIZER_NAME)
    state = {
        "format_version": FORMAT_VERSION,
        "step": eraser.steps_done,
        "losses": list(eraser.losses),
        "choices": [dict(counts) for counts in eraser.choices],
        **_record(eraser),
    }
    (folder / STATE_NAME).write_text(json.dumps(state, indent=2))


def _rotate(directory: Path, keep: int | None) -> None:
    """Remove all but the newest ``keep`` checkpoints; each is renamed away before it is
    deleted, so a kill meanwhile leaves no partial ``checkpoint-N``."""
    for leftover in directory.glob(".checkpoint-*.deleting"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep is None:
        return
    found = sorted(
        (int(m.group(1)), entry)
        for entry in directory.iterdir()
        if (m := CHECKPOINT_PATTERN.match(entry.name)) and entry.is_dir()
    )
    for _, folder in found[: max(len(found) - keep, 0)]:
        doomed = folder.with_name(f".{folder.name}.deleting")
        os.replace(folder, doomed)
        shutil.rmtree(doomed)


def save_checkpoint(
    eraser: Eraser, directory: str | os.PathLike, keep: int | None = None
) -> Path | None:
    """Write ``directory/checkpoint-<step>`` (main process only, all-or-nothing), then keep the
    newest ``keep`` checkpoints. Returns the folder on the main process, else ``None``."""
    if not eraser.accelerator.is_main_process:
        return None
    directory = Path(directory)
    name = f"checkpoint-{eraser.steps_done}"
    with atomic_save(directory) as stage:
        _write_checkpoint(eraser, stage / name)
    _rotate(directory, keep)
    return directory / name


def load_checkpoint(eraser: Eraser, folder: str | os.PathLike) -> None:
    """Restore ``eraser`` (built with the same pipeline, concepts, method and config) to the
    state saved in ``folder``: trained tensors, adversary logits, optimizer states, step."""
    folder = Path(folder)
    state = json.loads((folder / STATE_NAME).read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder / STATE_NAME}: format_version {state.get('format_version')!r}, this "
            f"release reads {FORMAT_VERSION}; resume with the release that wrote it."
        )
    expected = _record(eraser)
    for key, value in expected.items():
        if state[key] != value:
            raise ValueError(
                f"resume_from_checkpoint={folder}: its `{key}` is {state[key]!r}, this erasure's "
                f"is {value!r}; resume with the settings the checkpoint was written with."
            )
    if state["step"] > eraser.config.num_steps:
        raise ValueError(
            f"resume_from_checkpoint={folder} is at step {state['step']}, past `num_steps` "
            f"({eraser.config.num_steps}); raise num_steps or resume from an earlier checkpoint."
        )
    acc = eraser.accelerator
    tensors = load_file(str(folder / TENSORS_NAME))
    trained = set(eraser.trained_parameters)
    with torch.no_grad():
        for name, p in acc.unwrap_model(eraser.unet).named_parameters():
            if name in trained:
                p.copy_(tensors[f"unet.{name}"])
        for index, adversary in enumerate(eraser.adversaries):
            adversary.logits.copy_(tensors[f"adversary.{index}.logits"])
    optimizers = torch.load(folder / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
    eraser.optimizer.load_state_dict(optimizers["unet"])
    if eraser.adversary_optimizer is not None:
        eraser.adversary_optimizer.load_state_dict(optimizers["adversary"])
    if acc.scaler is not None and optimizers["scaler"] is not None:
        acc.scaler.load_state_dict(optimizers["scaler"])
    eraser.steps_done = int(state["step"])
    eraser.losses = [float(loss) for loss in state["losses"]]
    eraser.choices = [Counter(counts) for counts in state["choices"]]

"""Resuming from a ``Trainer`` checkpoint with the weights it really holds.

transformers 5 writes a model's checkpoint in the original key format of its architecture
(``save_pretrained`` reverts the key renames that ``from_pretrained`` applies: a ViT saves
``vit.encoder.layer.N...`` while its modules are ``vit.layers.N...``), but
``Trainer._load_from_checkpoint`` reads the file with a plain ``load_state_dict``
(transformers issue #43701). Every key is then "missing" or "unexpected", the load is non-strict,
and the resumed run silently continues from the initial weights with only a warning.
:func:`restore_pretrained_weights` loads them through ``from_pretrained`` first; Trainer's own
load then changes nothing, and it still restores the optimizer, scheduler, RNG states and step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel
from transformers.trainer_utils import get_last_checkpoint

__all__ = ["resolve_checkpoint", "restore_pretrained_weights"]


def resolve_checkpoint(value: str | bool | None, output_dir: str) -> str | None:
    """The folder that ``resume_from_checkpoint`` names: ``None`` / ``False`` / ``""``: none;
    ``True`` or ``"true"`` / ``"last"``: the newest ``checkpoint-N`` of ``output_dir``; else the
    given folder. A missing folder is refused, naming it and the fix."""
    if value is None or value is False or value == "":
        return None
    if value is True or str(value).lower() in ("true", "last"):
        path = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if path is None:
            raise ValueError(
                f"`resume_from_checkpoint={value}` but `output_dir` {output_dir} holds no "
                "checkpoint-N folder; pass the checkpoint's path or train without the flag."
            )
        return path
    if not Path(value).is_dir():
        raise ValueError(
            f"`resume_from_checkpoint`: no checkpoint folder at {value}; pass an existing "
            "checkpoint-N folder, or `last` for the newest one in `output_dir`."
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

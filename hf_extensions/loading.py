"""Checked reads of saved artifacts: a refusal names the file, what is wrong, and the fix.

Every hf-extensions loader first calls :func:`hf_extensions.atomic.recover_interrupted_save` on
the artifact's folder (so it reads one whole save), then reads through these helpers:

* :func:`read_json` / :func:`read_tensors`: a missing, cut or damaged file is refused by name
  (never a bare ``KeyError`` / ``SafetensorError``);
* :func:`check_tensors`: the tensors of a file against the names and shapes of what they load
  into. A missing tensor is refused (a loader never keeps the value that was there before), and
  so is a tensor of another shape (``Tensor.copy_`` would broadcast a ``[1]`` head bias into a
  ``[10]`` one without a word), or one the model does not have;
* :func:`load_peft_model` / :func:`check_peft_adapter`: a PEFT adapter folder, with the same
  checks (``PeftModel.from_pretrained`` alone only warns about missing adapter tensors).
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

__all__ = [
    "FIX",
    "check_peft_adapter",
    "check_tensors",
    "load_peft_model",
    "read_json",
    "read_safetensors_metadata",
    "read_tensors",
]

#: The fix named by every refusal of a saved artifact's content.
FIX = (
    "the save is incomplete or from another model; re-save it, or load it into the "
    "architecture it was saved from"
)
_SHOWN = 8


def _names(names: Collection[str]) -> str:
    names = sorted(names)
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    more = f", ... ({len(names)} in all)" if len(names) > _SHOWN else ""
    return f"[{shown}{more}]"


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the save is incomplete or the folder holds another artifact; "
            "re-save it, or pass the folder it was saved to."
        )


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in ``path``; a missing, damaged or non-object file is refused by name."""
    path = Path(path)
    _require_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): re-save the artifact.") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object: {FIX}.")
    return data


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of the safetensors file ``path`` (on CPU); a damaged file is refused by name."""
    path = Path(path)
    _require_file(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path} is not a readable safetensors file ({error}): re-save the artifact."
        ) from error


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata header of the safetensors file ``path`` (``{}`` when it has none)."""
    path = Path(path)
    _require_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"{path} is not a readable safetensors file ({error}): re-save the artifact."
        ) from error


def _shape(value: torch.Tensor | torch.Size | tuple | list) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def check_tensors(
    path: str | os.PathLike,
    found: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    optional: Collection[str] = (),
) -> None:
    """Refuse ``found`` (the tensors, or shapes, read from ``path``) unless it holds exactly the
    names of ``expected`` (tensors or shapes it loads into), each of the same shape.

    Names in ``optional`` may be absent (e.g. tensors a saver de-duplicated).

    Raises:
        ValueError: naming ``path``, the missing and unexpected tensors, every shape mismatch
            (the tensor, the saved shape and the expected one) and the fix.
    """
    problems = []
    missing = set(expected) - set(found) - set(optional)
    if missing:
        problems.append(f"lacks tensors {_names(missing)}")
    unexpected = set(found) - set(expected)
    if unexpected:
        problems.append(f"holds tensors the model does not have {_names(unexpected)}")
    for name in sorted(set(found) & set(expected)):
        saved, wanted = _shape(found[name]), _shape(expected[name])
        if saved != wanted:
            problems.append(f"tensor {name!r} has shape {saved}, the model's is {wanted}")
    if problems:
        raise ValueError(f"{path} {'; '.join(problems)}: {FIX}.")


def check_peft_adapter(model: Any, folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter tensors saved in ``folder``, checked against ``model``'s active adapter."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict

    path = Path(folder) / SAFETENSORS_WEIGHTS_NAME
    state = read_tensors(path)
    check_tensors(path, state, get_peft_model_state_dict(model))
    return state


def load_peft_model(model: torch.nn.Module, folder: str | os.PathLike, **kwargs: Any):
    """``PeftModel.from_pretrained(model, folder, **kwargs)``, refusing a missing tensor or one
    of another shape (by file, tensor and shapes) instead of warning or keeping the initial one."""
    from peft import PeftModel
    from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

    folder = Path(folder)
    _require_file(folder / CONFIG_NAME)
    read_tensors(folder / SAFETENSORS_WEIGHTS_NAME)  # a damaged file: refused by name first
    peft_model = PeftModel.from_pretrained(
        model, str(folder), ignore_mismatched_sizes=True, **kwargs
    )
    check_peft_adapter(peft_model, folder)
    return peft_model

"""Which UNet parameters an erasure edits: ``xattn | noxattn | selfattn | full``.

The groups of ESD (Gandikota et al. 2023) that EAP (Bui et al. 2024, Sec. 5) reuses, in
diffusers' parameter names: cross-attention is ``attn2``, self-attention ``attn1``; ``noxattn``
is everything but cross-attention, the time embedding and the output layers (``conv_norm_out``,
``conv_out``), the CompVis ``out.`` / ``time_embed`` exclusions of the official code.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from hf_extensions.pipelines.config import PARAMETER_GROUPS

__all__ = ["PARAMETER_GROUPS", "in_group", "select_parameters", "set_trainable"]

_NOXATTN_EXCLUDED = ("time_embedding", "conv_out", "conv_norm_out")


def in_group(name: str, group: str) -> bool:
    """Whether the UNet parameter ``name`` belongs to ``group``."""
    parts = name.split(".")
    if group == "xattn":
        return "attn2" in parts
    if group == "selfattn":
        return "attn1" in parts
    if group == "noxattn":
        return "attn2" not in parts and parts[0] not in _NOXATTN_EXCLUDED
    if group == "full":
        return True
    raise ValueError(f"`parameter_group` must be one of {PARAMETER_GROUPS}, got {group!r}.")


def select_parameters(
    unet: torch.nn.Module, group: str
) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of the UNet parameters in ``group``, in module order."""
    for name, parameter in unet.named_parameters():
        if in_group(name, group):
            yield name, parameter


def set_trainable(unet: torch.nn.Module, group: str) -> list[str]:
    """Make exactly ``group`` require gradients; return its parameter names.

    Raises ``ValueError`` when the group is empty in this UNet (e.g. ``xattn`` on a UNet with
    no cross-attention), rather than silently training nothing.
    """
    names = []
    for name, parameter in unet.named_parameters():
        chosen = in_group(name, group)
        parameter.requires_grad_(chosen)
        if chosen:
            names.append(name)
    if not names:
        raise ValueError(f"parameter_group={group!r} selects no parameter of this UNet.")
    return names

"""The property every config must have: a value is refused naming its field, or accepted.

Accepted means: the config holds a value of the field's declared kind, it saves to JSON, and
(for a run) the tiny run finishes with every loss, parameter and output finite. Only
``ValueError`` / ``TypeError`` count as a refusal, and only when the message names one of the
fields that were set; any other exception (a ``RuntimeError`` from torch, an ``IndexError``,
a ``ZeroDivisionError``, ...) is a crash deep in the code.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .runs import RUN_BASE, RUNNERS
from .specs import ConfigSpec
from .values import conforms, describe

REFUSALS = (ValueError, TypeError)


class Refused(Exception):
    """A config (or its run) was refused with an error that names a field: the user sees
    ``message``."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def names_a_field(message: str, fields) -> bool:
    """Whether ``message`` names one of ``fields`` as a word (``rho`` is not ``rho_train``)."""
    return any(re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message) for name in fields)


def refusal(error: BaseException, drawn: Mapping[str, Any], where: str) -> Refused:
    """``error`` as a :class:`Refused`; an ``AssertionError`` unless it is a ``ValueError`` /
    ``TypeError`` naming one of the ``drawn`` fields."""
    message = f"{type(error).__name__}: {error}"
    shown = {name: describe(value) for name, value in drawn.items()}
    if not isinstance(error, REFUSALS):
        raise AssertionError(f"{where} crashed with {message} for {shown}") from error
    if not names_a_field(str(error), drawn):
        raise AssertionError(f"{where} refused {shown} without naming it: {message}") from error
    return Refused(message)


def build(spec: ConfigSpec, drawn: Mapping[str, Any], base: Mapping[str, Any] | None = None):
    """``spec``'s config from ``base`` and the ``drawn`` values, checked: refused naming a drawn
    field (raises :class:`Refused`), or holding values of the declared kinds and saving to
    JSON."""
    try:
        config = spec.build(**{**(base or {}), **drawn})
    except Exception as error:  # every exception is judged by refusal()
        raise refusal(error, drawn, f"{spec.name}(...)") from error
    for name in drawn:
        held = held_value(config, name)
        assert conforms(spec.field(name), held), (
            f"{spec.name} accepted {name}={describe(drawn[name])} and holds "
            f"{describe(held)}, not a {spec.field(name).kind}"
        )
    spec.to_json(config)
    return config


def held_value(config, name: str):
    """What the config holds for field ``name`` (a diffusers scheduler keeps it in ``config``)."""
    if hasattr(config, "register_to_config"):
        return config.config[name]
    return getattr(config, name)


def nonfinite(values: Mapping[str, Any]) -> list[str]:
    """Names of the values with a NaN or infinite entry."""
    bad = []
    for name, value in values.items():
        tensor = torch.as_tensor(value.detach() if torch.is_tensor(value) else value)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    return bad


def run(spec: ConfigSpec, drawn: Mapping[str, Any]) -> str:
    """Build ``spec`` from its run base and ``drawn``, run it, and say what the user sees:
    ``"refused: <message>"`` or ``"accepted, trains finite"`` (``samples`` / ``quantizes``;
    anything else fails)."""
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        try:
            config = build(spec, drawn, RUN_BASE[spec.runner](workdir))
        except Refused as refused:
            return f"refused: {refused.message}"
        try:
            values = RUNNERS[spec.runner](config, workdir)
        except Exception as error:  # every exception is judged by refusal()
            return f"refused when run: {refusal(error, drawn, f'a {spec.name} run').message}"
    bad = nonfinite(values)
    shown = {name: describe(value) for name, value in drawn.items()}
    assert not bad, f"{spec.name} accepted {shown} and its run has non-finite {bad}"
    return (
        "accepted, "
        + {"s2n": "samples", "metaaug": "quantizes"}.get(spec.runner, "trains")
        + " finite"
    )

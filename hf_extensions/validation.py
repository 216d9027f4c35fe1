"""Field checks for every config: one message format, and NaN / ±inf refused wherever a number is.

Every check raises ``ValueError`` with the same sentence, naming the field, the value and what is
allowed::

    `rho` must be a finite number in [0, inf), got nan.
    `estimator` must be one of ('reparameterization', 'flipout'), got 'bayes'.
    `num_particles` must be an integer in [1, inf), got 2.5.

A comparison with NaN is always false, so a range check written as ``if value < low: raise``
lets NaN through; every numeric check here asks ``math.isfinite`` first. ``bool`` is not taken
for a number (``True`` would pass as 1).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = [
    "check_choice",
    "check_finite",
    "check_integer",
    "check_layer_indices",
    "check_positive",
    "check_range",
    "is_plain_int",
    "refuse",
]


def refuse(name: str, allowed: str, value: Any) -> None:
    """Raise the one message format: ``ValueError("`name` must be <allowed>, got <value>.")``.

    For conditions the checks below do not cover (``allowed`` says what would be accepted)."""
    raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_finite(name: str, value: Any) -> float:
    """``value`` as a float; refused unless it is a real number that is neither NaN nor ±inf."""
    if not _is_real(value) or not math.isfinite(value):
        refuse(name, "a finite number", value)
    return float(value)


def check_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float; refused unless finite and inside ``[low, high]`` (``(`` / ``)`` with
    the ``*_open`` flags; ``None``: unbounded on that side)."""
    allowed = "a finite number in " + _interval(low, high, low_open, high_open)
    if not _is_real(value) or not math.isfinite(value):
        refuse(name, allowed, value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        refuse(name, allowed, value)
    return float(value)


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` as a float; refused unless finite and ``> 0`` (``>= 0`` with ``allow_zero``)."""
    return check_range(name, value, low=0.0, low_open=not allow_zero)


def is_plain_int(value: Any) -> bool:
    """A Python ``int`` that is not a bool (no numpy integer: what a JSON-saved config holds)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_integer(
    name: str, value: Any, *, low: int | None = None, high: int | None = None, plain: bool = False
) -> int:
    """``value`` as an int; refused unless an integer (not a bool, not 2.5) in ``[low, high]``;
    with ``plain``, a Python ``int`` only (:func:`is_plain_int`: a config saved as JSON)."""
    allowed = "an integer in " + _interval(low, high, False, False)
    integral = is_plain_int(value) if plain else isinstance(value, numbers.Integral)
    if not integral or isinstance(value, bool):
        refuse(name, allowed, value)
    if (low is not None and value < low) or (high is not None and value > high):
        refuse(name, allowed, value)
    return int(value)


def check_layer_indices(name: str, value: Any) -> list[int] | None:
    """``None`` (all layers) or ``value`` as a list of layer indices (plain ints, each once)."""
    if value is None:
        return None
    layers = list(value)
    if not layers or not all(is_plain_int(i) for i in layers):
        refuse(name, "None (all layers) or a non-empty list of layer indices", value)
    if len(set(layers)) != len(layers):
        refuse(name, "None or a list naming each layer once", value)
    return layers


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """``value``; refused unless it is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        refuse(name, f"one of {allowed}", value)
    return value

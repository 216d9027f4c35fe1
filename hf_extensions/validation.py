"""Field checks for every config: one message format, and NaN / ±inf refused wherever a number is.

Every check raises ``ValueError`` with the same sentence, naming the field, the value and what is
allowed::

    `rho` must be a finite number in [0, inf), got nan.
    `estimator` must be one of ('reparameterization', 'flipout'), got 'bayes'.
    `num_particles` must be an integer in [1, inf), got 2.5.

A comparison with NaN is always false, so a range check written as ``if value < low: raise``
lets NaN through; every numeric check here asks ``math.isfinite`` first. ``bool`` is not taken
for a number (``True`` would pass as 1), and a number is not taken for a bool (``"no"`` is truthy).

Every check returns the value as a plain Python object (``float``, ``int``, ``bool``, ``str``,
``list``): a config assigns it back, so that it holds what its ``config.json`` can store (a numpy
integer would make the save fail) whatever the caller passed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = [
    "MAX_SEED",
    "available_memory",
    "check_allocation",
    "check_bool",
    "check_choice",
    "check_finite",
    "check_finite_tensor",
    "check_integer",
    "check_layer_indices",
    "check_names",
    "check_positive",
    "check_range",
    "check_text",
    "is_plain_int",
    "refuse",
]


#: Largest seed a config takes: numpy seeds (k-means, ``transformers.set_seed``) must be below
#: 2**32, and the methods derive more seeds as ``seed + k``, so half the range is left to them.
MAX_SEED = 2**31 - 1


def refuse(name: str, allowed: str, value: Any) -> None:
    """Raise the one message format: ``ValueError("`name` must be <allowed>, got <value>.")``.

    For conditions the checks below do not cover (``allowed`` says what would be accepted)."""
    raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def _is_bool(value: Any) -> bool:
    """A Python or numpy bool (``numpy.bool_`` is no ``bool`` subclass but equals 1 / 0)."""
    return isinstance(value, bool) or type(value).__name__ in ("bool", "bool_")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not _is_bool(value)


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
    if not integral or _is_bool(value):
        refuse(name, allowed, value)
    if (low is not None and value < low) or (high is not None and value > high):
        refuse(name, allowed, value)
    return int(value)


def check_layer_indices(name: str, value: Any) -> list[int] | None:
    """``None`` (all layers) or ``value`` as a list of layer indices (plain ints, each once)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        refuse(name, "None (all layers) or a non-empty list of layer indices", value)
    layers = list(value)
    if not layers or not all(is_plain_int(i) for i in layers):
        refuse(name, "None (all layers) or a non-empty list of layer indices", value)
    if len(set(layers)) != len(layers):
        refuse(name, "None or a list naming each layer once", value)
    return layers


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """The entry of ``allowed`` equal to ``value``; refused unless there is one (a bool never
    matches a number: ``True == 1``)."""
    allowed = tuple(allowed)
    for option in allowed:
        if _is_bool(option) != _is_bool(value):
            continue
        try:
            if bool(option == value):
                return option
        except (TypeError, ValueError):  # an array compares element-wise
            continue
    refuse(name, f"one of {allowed}", value)


def check_bool(name: str, value: Any, *, optional: bool = False) -> bool | None:
    """``value``; refused unless it is ``True`` or ``False`` (or ``None`` with ``optional``)."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        refuse(name, "True or False" + (" or None" if optional else ""), value)
    return value


def check_text(name: str, value: Any, allowed: str = "a non-empty string") -> str:
    """``value``; refused unless it is a non-empty ``str`` (``allowed`` says what it names)."""
    if not isinstance(value, str) or not value:
        refuse(name, allowed, value)
    return str(value)


def check_names(
    name: str, value: Any, *, optional: bool = True, allow_empty: bool = False
) -> list[str] | None:
    """``value`` as a list of non-empty strings (module names, words); a single string is not
    taken for a list of its characters. ``None`` passes with ``optional``; an empty list only
    with ``allow_empty``."""
    if value is None and optional:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        refuse(name, "a list of non-empty strings" + (" or None" if optional else ""), value)
    names = list(value)
    if (not names and not allow_empty) or not all(isinstance(n, str) and n for n in names):
        refuse(name, "a non-empty list of non-empty strings", value)
    return [str(n) for n in names]


def check_finite_tensor(name: str, value: Any) -> Any:
    """``value`` (a tensor or array); refused if any entry is NaN or ±inf (the message counts
    them)."""
    import torch

    tensor = torch.as_tensor(value)
    if tensor.is_floating_point() or tensor.is_complex():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(
                f"`{name}` must be finite everywhere, got {bad} NaN or infinite values of "
                f"{tensor.numel()}."
            )
    return value


def available_memory(device: Any) -> int | None:
    """Bytes free on ``device``: ``torch.cuda.mem_get_info`` on a GPU, the host's available
    memory (``psutil``) on the CPU; ``None`` where it is unknown (then nothing is refused)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        import psutil  # a dependency of accelerate

        return int(psutil.virtual_memory().available)
    return None


def check_allocation(name: str, nbytes: int, device: Any, *, what: str, fix: str) -> None:
    """Refuse, naming ``name``, an allocation of ``nbytes`` that cannot fit in the memory free on
    ``device`` (checked before allocating: otherwise the process is killed, or torch fails deep
    inside an allocator after the config was taken)."""
    free = available_memory(device)
    if free is not None and nbytes > free:
        mib = 2**20
        raise ValueError(
            f"`{name}` makes {what} of {nbytes / mib:,.0f} MiB, more than the {free / mib:,.0f} "
            f"MiB free on {device}: {fix}."
        )

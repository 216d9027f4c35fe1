"""The values the fuzz gives a config field: hostile ones for construction, plausible ones for runs.

A field is described by its :class:`Field` (kind from the annotation, the choices of a string
field). :func:`construction_values` draws anything: numbers at every scale, 0, negatives, NaN,
±inf, numpy scalars, wrong types (str, None, list, dict, bool). :func:`run_values` draws what a
user would plausibly set (sizes small enough for a tiny run, weights and rates in ordinary
ranges), plus the non-finite and wrongly typed values (refused before anything runs): an
accepted run value must then train / sample without NaN.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

NAN, INF = float("nan"), float("inf")

#: Values every field is tried with, whatever its type.
HOSTILE = (
    0, 1, -1, 2, 3, 2**31, 10**15, -(10**15),
    0.0, -0.0, 0.5, 1.0, 1.5, -0.5, 1e-300, 5e-324, 1e300, -1e300, NAN, INF, -INF,
    True, False, None, "", "abc", "0.1", "none", "True",
    [], [0], [0, 0], [-1], ["abc"], [None], {"a": 1}, (1,),
    np.float64(0.25), np.float32("nan"), np.int64(2), np.bool_(True),
)  # fmt: skip

#: The kinds of field this fuzz knows (from the annotation, optional-ness aside).
KINDS = ("float", "int", "bool", "str", "list[str]", "list[int]", "list[float]")


@dataclass(frozen=True)
class Field:
    """A config field: ``kind`` one of :data:`KINDS`, ``optional`` when ``None`` is allowed,
    ``choices`` for a string field with a fixed set of values, ``run`` a plausible-value
    strategy for runs (default: :func:`plausible` of the kind)."""

    name: str
    kind: str
    optional: bool = False
    choices: tuple = ()
    run: st.SearchStrategy | None = None


def parse_annotation(annotation: str) -> tuple[str, bool]:
    """``("float", True)`` for ``"float | None"``; the kind must be one of :data:`KINDS`."""
    parts = [p.strip() for p in str(annotation).split("|")]
    optional = "None" in parts
    parts = [p for p in parts if p != "None"]
    kind = parts[0] if len(parts) == 1 else "|".join(parts)
    if kind not in KINDS:
        raise TypeError(f"unknown field annotation {annotation!r}")
    return kind, optional


def fields_of(cls: type, names, choices=None, run=None) -> tuple[Field, ...]:
    """:class:`Field` s of dataclass ``cls`` for ``names`` (kinds from the annotations)."""
    choices, run = choices or {}, run or {}
    declared = {f.name: f for f in dataclasses.fields(cls)}
    out = []
    for name in names:
        kind, optional = parse_annotation(declared[name].type)
        out.append(Field(name, kind, optional, tuple(choices.get(name, ())), run.get(name)))
    return tuple(out)


def _typed(field: Field) -> st.SearchStrategy:
    kind = field.kind
    if kind == "float":
        return st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**6), 10**6)
    if kind == "int":
        return st.integers(-(2**40), 2**40) | st.floats(-10, 10)
    if kind == "bool":
        return st.booleans()
    if kind == "str":
        text = st.text(max_size=8)
        return st.sampled_from(field.choices) | text if field.choices else text
    if kind == "list[str]":
        return st.lists(st.text(max_size=6), max_size=3)
    if kind == "list[float]":
        return st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4)
    return st.lists(st.integers(-4, 6), max_size=4)


def construction_values(field: Field) -> st.SearchStrategy:
    """Anything: :data:`HOSTILE` or a value of the field's kind at any scale."""
    return st.sampled_from(HOSTILE) | _typed(field)


def plausible(field: Field) -> st.SearchStrategy:
    """What a user would set: small sizes, ordinary weights and rates (boundaries included).

    Finite but extreme magnitudes (a temperature of 1e-30, a learning rate of 1e6) are tried by
    construction only: they are valid settings whose runs may overflow, as in stock training."""
    kind = field.kind
    if kind == "float":  # ordinary settings, 0 included (a boundary many fields refuse)
        return st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0, 2.0]) | st.floats(0.01, 2.0)
    if kind == "int":
        return st.integers(-1, 4)
    if kind == "bool":
        return st.booleans()
    if kind == "str":
        return st.sampled_from(field.choices) if field.choices else st.sampled_from(["x", "a b"])
    if kind == "list[str]":
        return st.lists(st.sampled_from(["x", "classifier"]), min_size=0, max_size=2)
    if kind == "list[float]":
        return st.lists(st.sampled_from([0.0, 0.01, 0.5, 1.0]), max_size=4)
    return st.lists(st.integers(-1, 2), max_size=3)


#: Refused before anything runs (non-finite, wrong type): cheap to mix into run examples.
_REFUSED = (NAN, INF, -INF, "abc", [], {"a": 1}, -1e300)


#: Fields naming a Hub id or path: a run loads them, and a wrong one is the loader's own
#: ``OSError``; they are fuzzed by construction only (their runs keep the offline default).
LOADED_FIELDS = ("model_name_or_path", "dataset_name", "dataset_config_name", "data_dir")


def run_values(field: Field) -> st.SearchStrategy:
    """:func:`plausible` values (or the field's own ``run`` strategy), ``None`` when optional,
    and a few values that must be refused."""
    if field.name in LOADED_FIELDS:
        return st.just(None)
    base = field.run if field.run is not None else plausible(field)
    extra = [None] if field.optional else []
    return base | st.sampled_from([*_REFUSED, *extra])


def conforms(field: Field, value) -> bool:
    """Whether an accepted config holds a value of the field's declared kind (a bool is no
    number; an int is a float; numpy scalars are not plain Python values)."""
    if value is None:
        return field.optional
    kind = field.kind
    if kind == "float":
        return type(value) in (int, float) and math.isfinite(value)  # a plain, finite Python number
    if kind == "int":
        return type(value) is int
    if kind == "bool":
        return type(value) is bool
    if kind == "str":
        return type(value) is str and (not field.choices or value in field.choices)
    if kind == "list[float]":
        return type(value) is list and all(
            type(v) in (int, float) and math.isfinite(v) for v in value
        )
    item = str if kind == "list[str]" else int
    return type(value) is list and all(type(v) is item for v in value)


def describe(value) -> str:
    """A short, stable label of a value for the report table."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, numbers.Number) and not isinstance(value, (bool, int, float)):
        return f"{type(value).__module__}.{type(value).__name__}({value})"
    return repr(value)

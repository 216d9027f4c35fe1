"""Fuzz of every public config class (hypothesis): a value is refused naming its field, or accepted.

For each class of ``tests/config_fuzz/specs.py`` (checked against the packages' modules: a new
public config class without a spec fails ``test_every_public_config_class_is_fuzzed``):

- construction: every field gets numbers at every scale, 0, negatives, NaN, ±inf, numpy scalars
  and wrong types (str, None, list, dict, bool). The config must raise ``ValueError`` /
  ``TypeError`` naming the field, or hold a value of the declared kind and save to JSON.
- runs: one or two fields get plausible values (plus refused ones), and an accepted config runs
  on a tiny model (a few training steps, a sampling loop, a quantization): every loss,
  parameter and output must be finite. Any exception but a ``ValueError`` / ``TypeError`` that
  names a drawn field (a ``RuntimeError`` from torch, an ``IndexError``...) fails.

The default suite runs the hostile sweep, 30 construction draws and 2 runs per class (about
20 s on 2 cores); the slow variant runs 25 per class. Every example is derandomized (the same
on every CI run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import pkgutil

import pytest
from config_fuzz import check
from config_fuzz.specs import SPECS
from config_fuzz.values import HOSTILE, construction_values, describe, run_values
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

#: The packages whose public classes are searched for configs.
PACKAGES = ("trainers", "peft_configs", "hf_extensions")
_RUNNABLE = [spec for spec in SPECS if spec.runner is not None]
#: Abstract bases without fields of their own (RegisteredPeftConfig) are in SPECS only.
_FIELDED = [spec for spec in SPECS if spec.fields]
_FUZZ = dict(derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))


def _is_config_class(cls: type) -> bool:
    """A class users configure a method with: a ``TrainingArguments`` / ``PeftConfig`` /
    quantization config / diffusers config (``register_to_config``) / transformers config
    subclass, or a dataclass named ``*Config`` / ``*Arguments``."""
    from diffusers.configuration_utils import ConfigMixin
    from peft.config import PeftConfig
    from transformers import PretrainedConfig, TrainingArguments
    from transformers.utils.quantization_config import QuantizationConfigMixin

    bases = (TrainingArguments, PeftConfig, QuantizationConfigMixin, ConfigMixin, PretrainedConfig)
    if issubclass(cls, bases):
        return True
    return dataclasses.is_dataclass(cls) and cls.__name__.endswith(("Config", "Arguments"))


def _public_config_classes() -> set[str]:
    found = set()
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        modules = [package] + [
            importlib.import_module(info.name)
            for info in pkgutil.walk_packages(package.__path__, f"{package_name}.")
        ]
        for module in modules:
            for name, value in vars(module).items():
                if (
                    isinstance(value, type)
                    and not name.startswith("_")
                    and value.__module__ == module.__name__
                    and _is_config_class(value)
                ):
                    found.add(f"{module.__name__}.{name}")
    return found


def test_every_public_config_class_is_fuzzed():
    found = _public_config_classes()
    specified = {f"{spec.cls.__module__}.{spec.name}" for spec in SPECS}
    assert found - specified == set(), (
        "public config classes without a fuzz spec (add them to tests/config_fuzz/specs.py): "
        f"{sorted(found - specified)}"
    )
    assert specified - found == set(), f"specs of unknown classes: {sorted(specified - found)}"


def test_every_field_of_every_config_is_fuzzed():
    """A dataclass field added to a config without a spec entry fails here (TrainingArguments
    and PeftConfig fields are the libraries'; the optimisation numbers are fuzzed anyway)."""
    from peft.config import PeftConfig
    from transformers import TrainingArguments
    from transformers.utils.quantization_config import QuantizationConfigMixin

    for spec in SPECS:
        if not dataclasses.is_dataclass(spec.cls):
            continue
        library = set()
        for base in (TrainingArguments, PeftConfig, QuantizationConfigMixin):
            if issubclass(spec.cls, base) and dataclasses.is_dataclass(base):
                library = {f.name for f in dataclasses.fields(base)}
        own = {f.name for f in dataclasses.fields(spec.cls)} - library
        missing = own - {f.name for f in spec.fields}
        assert not missing, f"{spec.name}: fields without a fuzz entry: {sorted(missing)}"


@pytest.mark.parametrize("spec", _FIELDED, ids=lambda spec: spec.name)
def test_hostile_values_are_refused_naming_the_field_or_held_as_declared(spec):
    """Every field x every value of ``HOSTILE`` (0, ±1, 2**31, 1e15, ±1e300, subnormals, NaN,
    ±inf, bools, None, strings, lists, a dict, numpy scalars), the rest at defaults."""
    for field in spec.fields:
        for value in HOSTILE:
            with contextlib.suppress(check.Refused):
                check.build(spec, {field.name: value})


@pytest.mark.parametrize("spec", _FIELDED, ids=lambda spec: spec.name)
@settings(max_examples=30, **_FUZZ)
@given(data=st.data())
def test_construction_fuzz(spec, data):
    """One or two fields drawn at any scale and type, the rest at defaults."""
    drawn = {}
    for field in data.draw(st.lists(st.sampled_from(spec.fields), min_size=1, max_size=2)):
        drawn[field.name] = data.draw(construction_values(field), label=field.name)
    with contextlib.suppress(check.Refused):
        check.build(spec, drawn)


def _draw_run(spec, data) -> dict:
    fields = data.draw(st.lists(st.sampled_from(spec.fields), min_size=1, max_size=2))
    return {f.name: data.draw(run_values(f), label=f.name) for f in fields}


@pytest.mark.parametrize("spec", _RUNNABLE, ids=lambda spec: spec.name)
@settings(max_examples=2, **_FUZZ)
@given(data=st.data())
def test_accepted_configs_run_finite(spec, data):
    """Two plausible draws per class: refused naming a drawn field, or a finite run."""
    check.run(spec, _draw_run(spec, data))


@pytest.mark.slow
@pytest.mark.parametrize("spec", _RUNNABLE, ids=lambda spec: spec.name)
@settings(max_examples=25, **_FUZZ)
@given(data=st.data())
def test_accepted_configs_run_finite_many(spec, data):
    check.run(spec, _draw_run(spec, data))


def test_run_outcomes_are_reported_by_what_the_user_sees():
    """The harness's own contract: a refusal that names no drawn field fails, as does a
    crash; a finite run reads "accepted, trains finite" (so the fuzz can fail)."""
    sam = next(spec for spec in SPECS if spec.name == "SAMConfig")
    assert check.run(sam, {"rho": 0.1}) == "accepted, trains finite"
    assert check.run(sam, {"rho": float("nan")}).startswith("refused: ValueError: `rho`")
    with pytest.raises(AssertionError, match="without naming it"):
        check.refusal(ValueError("something is wrong"), {"rho": 1.0}, "x")
    with pytest.raises(AssertionError, match="crashed with IndexError"):
        check.refusal(IndexError("index 3 out of range"), {"rho": 1.0}, "x")
    assert describe(float("nan")) == "nan"

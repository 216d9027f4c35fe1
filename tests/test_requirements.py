"""The install sets: requirements/min.txt pins pyproject.toml's lower bounds exactly, and the lock
satisfies pyproject.toml (so `make test` tests versions a user's `pip install` may get)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"])
    for extra, items in project["optional-dependencies"].items():
        texts += [item for item in items if not item.startswith("hf-extensions")]
        assert items, extra
    return [Requirement(text) for text in texts]


def _pins(name: str) -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"{name}: {line} is not an exact pin"
            pins[canonicalize_name(requirement.name)] = Version(specifier.version)
    return pins


def _lower_bound(requirement: Requirement) -> Version:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert len(bounds) == 1, f"pyproject.toml: {requirement} needs exactly one `>=` lower bound"
    return bounds[0]


def test_min_set_pins_exactly_the_lower_bounds_of_pyproject():
    requirements = {canonicalize_name(r.name): r for r in _project_requirements()}
    requirements.pop("torch")  # torch comes from TORCH_SPEC (a CPU wheel here)
    pins = _pins("min.txt")
    assert set(pins) == set(requirements), (
        "requirements/min.txt and pyproject.toml list different packages: "
        f"{sorted(set(pins) ^ set(requirements))}"
    )
    for name, requirement in requirements.items():
        assert pins[name] == _lower_bound(requirement), (
            f"requirements/min.txt pins {name}=={pins[name]} but pyproject.toml says "
            f"{requirement}: keep them equal"
        )


def test_lock_satisfies_pyproject():
    pins = _pins("lock.txt")
    for requirement in _project_requirements():
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in pins, f"requirements/lock.txt has no pin for {name}: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements/lock.txt pins {name}=={pins[name]}, outside pyproject's {requirement}"
        )

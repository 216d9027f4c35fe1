"""The zoo: small, genuinely trained stand-ins for the papers' models, built here from embedded
data (the hard digits of :mod:`hf_extensions.data.hard_digits`).

Each fixture is a ``save_pretrained`` folder under ``zoo/<name>/`` at the repository root (outside
the installable packages; ``HF_EXTENSIONS_ZOO`` points elsewhere), loaded with the stock
``from_pretrained`` of its class, with a card (data, command, training curve, measured quality)
and a ``quality.json`` that ``tests/test_zoo.py`` holds the reloaded folder to.

    python -m hf_extensions.zoo list
    python -m hf_extensions.zoo build vit          # deterministic; minutes on 2 cores
    python -m hf_extensions.zoo check vit          # reload and re-measure

A fixture module defines ``DESCRIPTION``, ``DEFAULT_STEPS``, ``build(options) -> Path`` and
``evaluate(folder) -> dict[str, float]`` (the same numbers as its ``quality.json``).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

__all__ = ["FIXTURES", "fixture_module", "fixture_path", "zoo_root"]

#: fixture name -> module that builds and evaluates it
FIXTURES: dict[str, str] = {
    "vit": "hf_extensions.zoo.vit",
    "resnet20": "hf_extensions.zoo.resnet",
    "clip": "hf_extensions.zoo.clip",
    "digit_scorer": "hf_extensions.zoo.scorer",
    "text_to_image": "hf_extensions.zoo.text_to_image",
}


def zoo_root() -> Path:
    """The folder holding the built fixtures: ``$HF_EXTENSIONS_ZOO`` or ``<repository>/zoo``."""
    override = os.environ.get("HF_EXTENSIONS_ZOO")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "zoo"


def fixture_module(name: str) -> ModuleType:
    """The module that builds and evaluates fixture ``name``."""
    if name not in FIXTURES:
        raise ValueError(f"`name` must be one of {sorted(FIXTURES)}, got {name!r}.")
    return importlib.import_module(FIXTURES[name])


def fixture_path(name: str) -> Path:
    """The built folder of fixture ``name``; raises with the build command when it is missing."""
    if name not in FIXTURES:
        raise ValueError(f"`name` must be one of {sorted(FIXTURES)}, got {name!r}.")
    folder = zoo_root() / name
    if not (folder / "quality.json").is_file():
        raise FileNotFoundError(
            f"the zoo fixture {name!r} is not built at {folder}: run "
            f"`python -m hf_extensions.zoo build {name}` (or set HF_EXTENSIONS_ZOO to the folder "
            "that holds the built zoo)."
        )
    return folder

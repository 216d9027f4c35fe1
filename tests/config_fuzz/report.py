"""Print the fuzz's table: config class / field / input tried / what the user sees.

Every field of every class gets one hostile input of its kind (NaN for a number, 2.5 for a
count, ``"no"`` for a flag, ``"abc"`` for a choice, ``3`` for a list); every runnable class gets
a few accepted settings run on its tiny model. Run from the repository root::

    PYTHONPATH=.:tests python -m config_fuzz.report [--runs] [CLASS ...]
"""

from __future__ import annotations

import contextlib
import io
import math
import sys

from .check import Refused, build, run
from .specs import SPECS
from .values import describe

#: One hostile input per kind of field.
HOSTILE_BY_KIND = {
    "float": math.nan,
    "int": 2.5,
    "bool": "no",
    "str": "abc",
    "list[str]": 3,
    "list[int]": 3,
    "list[float]": [math.inf],
}

#: Accepted settings run on the tiny model (one per runnable class).
RUNS = {
    "SAMConfig": {"rho": 0.5, "adaptive": True},
    "AgnosticSAMConfig": {"rho_val": 0.1, "chain": True},
    "FHBIConfig": {"num_particles": 3, "kernel_bandwidth": 0.5},
    "BayesianMutualLearningConfig": {"feature_divergence": "kl", "feature_diversity_bound": "log"},
    "HierarchicalPromptCLConfig": {"use_ot": True, "ot_samples": 4},
    "PromptDSIConfig": {"strategy": "sequential"},
    "PGAConfig": {"pga_source_only": True, "pga_align": 0.0},
    "PromptPoolConfig": {"key_source": "fixed", "top_k": 2},
    "SharedPrefixTuningConfig": {"share": "global_mlp", "dropout": 0.5},
    "ErasureConfig": {"loss_space": "epsilon", "adversary_estimator": "score_function"},
    "S2NGeneralizedScheduler": {"rho": 1.0, "solver_order": 2},
    "MetaAugConfig": {"method": "metaaug", "weight_bits": 2},
    "ImageClassificationArguments": {"label_noise": 0.5, "image_size": 6, "patch_size": 3},
}


def _seen(text: str, width: int = 150) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 3] + "..."


def rows(names=(), runs: bool = False):
    """``(class, field, input, what the user sees)`` for every field of the chosen classes."""
    for spec in SPECS:
        if names and spec.name not in names:
            continue
        for field in spec.fields:
            value = HOSTILE_BY_KIND[field.kind]
            try:
                build(spec, {field.name: value})
                seen = "accepted"
            except Refused as refused:
                seen = refused.message
            yield spec.name, field.name, describe(value), _seen(seen)
        if runs and spec.name in RUNS:
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
            ):
                seen = run(spec, RUNS[spec.name])
            drawn = ", ".join(f"{k}={describe(v)}" for k, v in RUNS[spec.name].items())
            yield spec.name, "(run)", drawn, _seen(seen)


def main(argv: list[str]) -> None:
    runs = "--runs" in argv
    names = [a for a in argv if not a.startswith("--")]
    print("| config class | field | input tried | what the user sees |")
    print("|---|---|---|---|")
    for row in rows(names, runs):
        print("| " + " | ".join(f"`{row[0]}`" if i == 0 else row[i] for i in range(4)) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])

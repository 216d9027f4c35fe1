"""Run every method beside its baseline on the zoo's trained fixtures; one table, one figure.

``make demo`` (= ``python -m recipes.demo``) runs each entry of :data:`REGISTRY` in turn. An
entry names a recipe module whose ``demo()`` runs the method's demo setting (offline, CPU, on a
fixture of ``zoo/``) and returns a :class:`hf_extensions.demo.Comparison` (the same metrics for
the baseline and the method, and the fixture's own quality) or bare ``{metric: value}``. The
table marks each metric better / worse / tie for the method, including where it loses; the
figure (``--figure``, default ``outputs/demo/summary.png``) shows each method's headline gain.

    python -m recipes.demo                 # everything
    python -m recipes.demo --only example  # one or more entries
    python -m recipes.demo --list
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from hf_extensions.demo import Comparison
from hf_extensions.evidence import evidence_for

#: name -> (module with a ``demo()`` function, one-line description)
REGISTRY: dict[str, tuple[str, str]] = {
    "example": (
        "recipes.example.train",
        "stock Trainer, tiny ViT on digits (the recipe convention; no baseline)",
    ),
    "agnostic_sam": (
        "recipes.agnostic_sam.train",
        "Agnostic-SAM vs rho 0: zoo ViT on held-out hard-digit styles, 40% label noise",
    ),
    "shared_prefix": (
        "recipes.shared_prefix.train",
        "shared-structure prefix vs independent prefixes: frozen zoo ViT, 40 digit x ink classes",
    ),
    "bnn_mutual": (
        "recipes.bnn_mutual.train",
        "BNN mutual learning + diversity vs DML: 2 peers from the zoo ViT (MOPED)",
    ),
    "prompt_dsi": (
        "recipes.prompt_dsi.train",
        "PromptDSI vs sequential fine-tuning: MiniLM DSI on stdlib docstrings, one increment",
    ),
    "hierarchical_cl": (
        "recipes.hierarchical_cl.train",
        "taxonomy + OT prompts vs HiDe-Prompt: frozen zoo ViT, 40 digit x ink classes in 5 tasks",
    ),
    "fhbi": (
        "recipes.fhbi.train",
        "FHBI vs SVGD (rho 0): 4 LoRA particles of the zoo ViT on held-out hard-digit styles",
    ),
    "pga": (
        "recipes.pga.train",
        "PGA vs ERM prompts (and zero-shot): zoo CLIP, noisy -> cluttered hard digits",
    ),
    "erasure": (
        "recipes.erasure.train",
        "EAP vs ESD: erase 'seven' from the zoo text-to-image model, scored by the zoo scorer",
    ),
    "quantization": (
        "recipes.quantization.train",
        "MetaAug vs QDrop: zoo ResNet-20 (40 classes) at W2A4 from 128 images",
    ),
    "s2n": (
        "recipes.s2n.sample",
        "S2N scheduler vs DDIM: zoo text-to-image model, prompted digit recognised per rho/steps",
    ),
}


Result = Comparison | dict[str, float] | str  # a comparison, bare figures, or the error


def run_entry(name: str) -> Comparison | dict[str, float]:
    module_name, _ = REGISTRY[name]
    return importlib.import_module(module_name).demo()


def _cells(result: Result) -> list[tuple[str, str, str, str]]:
    """(metric, baseline, method, verdict) cells of one entry."""
    if isinstance(result, str):  # the traceback is printed above the table
        return [("FAILED", "", result if len(result) <= 90 else result[:87] + "...", "")]
    if isinstance(result, Comparison):
        cells = [
            (metric, f"{before:.4g}", f"{after:.4g}", result.verdict(metric))
            for metric, (before, after) in result.metrics.items()
        ]
        if result.fixture:
            quality = ", ".join(f"{k} {v:.3g}" for k, v in result.fixture_quality.items())
            cells.append((f"fixture zoo/{result.fixture}", "", quality, ""))
        return cells
    return [(metric, "", f"{value:.4g}", "") for metric, value in result.items()]


def format_table(rows: list[tuple[str, str, Result, float]]) -> str:
    """One line per (method, metric): method | baseline | metric | baseline value | method
    value | verdict | seconds. Bare figures (no baseline) leave the baseline cells empty."""
    lines = [("method", "baseline", "metric", "baseline value", "method value", "", "time (s)")]
    for name, _, result, seconds in rows:
        against = result.baseline if isinstance(result, Comparison) else ""
        for i, (metric, before, after, verdict) in enumerate(_cells(result)):
            first = i == 0
            lines.append(
                (
                    name if first else "",
                    against if first else "",
                    metric,
                    before,
                    after,
                    verdict,
                    f"{seconds:.1f}" if first else "",
                )
            )
    widths = [max(len(row[c]) for row in lines) for c in range(len(lines[0]))]
    rule = "  ".join("-" * w for w in widths)
    text = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
    return "\n".join([text[0], rule, *text[1:]])


def format_evidence(names) -> str:
    """The benchmark evidence of each entry that has some (:mod:`hf_extensions.evidence`): a
    demo row is one seed of one setting; the evidence is the tested claim."""
    lines = [f"{name}: {evidence.line()}" for name in names
             if (evidence := evidence_for(name)) is not None]  # fmt: skip
    if not lines:
        return ""
    return "\nbenchmark evidence (paired seeds, 95% intervals):\n" + "\n".join(lines)


def save_figure(rows: list[tuple[str, str, Result, float]], path: Path) -> Path | None:
    """One bar per compared method: its headline metric's gain over the baseline, in percent of
    the larger of the two values (metrics differ in scale; a baseline of 0 stays finite;
    positive: the method is better), labelled with both values. ``None`` when nothing was
    compared."""
    compared = [(name, r) for name, _, r, _ in rows if isinstance(r, Comparison) and r.metrics]
    if not compared:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, gains, notes = [], [], []
    for name, result in compared:
        metric = next(iter(result.metrics))
        before, after = result.metrics[metric]
        labels.append(f"{name}\n{metric}")
        gains.append(100.0 * result.gain(metric) / max(abs(before), abs(after), 1e-12))
        notes.append(f"{before:.3g} -> {after:.3g}")
    figure, axes = plt.subplots(figsize=(7, 0.6 * len(labels) + 1.2))
    colours = ["tab:green" if g > 0 else "tab:red" for g in gains]
    axes.barh(range(len(labels)), gains, color=colours)
    axes.set_yticks(range(len(labels)), labels, fontsize=8)
    axes.axvline(0.0, color="black", linewidth=0.8)
    for y, (gain, note) in enumerate(zip(gains, notes)):
        axes.annotate(note, (gain, y), fontsize=7, va="center", xytext=(3, 0),
                      textcoords="offset points")  # fmt: skip
    axes.invert_yaxis()
    axes.set_xlabel("headline metric: method - baseline, % of the larger (positive: method better)",
                    fontsize=8)  # fmt: skip
    axes.set_title("make demo: each method beside its baseline, on the zoo fixtures", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(REGISTRY), help="entries to run")
    parser.add_argument("--list", action="store_true", help="list the entries and exit")
    parser.add_argument("--figure", type=Path, default=Path("outputs/demo/summary.png"),
                        help="where the summary figure is written")  # fmt: skip
    args = parser.parse_args(argv)
    if args.list:
        for name, (module, description) in REGISTRY.items():
            print(f"{name:<20} {module:<40} {description}")
        return 0
    rows = []
    for name in args.only or list(REGISTRY):
        print(f"== {name}: {REGISTRY[name][1]}", flush=True)
        start = time.perf_counter()
        try:
            result: Result = run_entry(name)
        except Exception as error:  # one failing method must not hide the others' results
            traceback.print_exc()
            result = f"{type(error).__name__}: {error}"
        rows.append((name, REGISTRY[name][1], result, time.perf_counter() - start))
    print()
    print(format_table(rows))
    print(format_evidence(name for name, *_ in rows))
    figure = save_figure(rows, args.figure)
    if figure is not None:
        print(f"\nsummary figure: {figure}")
    return int(any(isinstance(row[2], str) for row in rows))


if __name__ == "__main__":
    sys.exit(main())

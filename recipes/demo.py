"""Run every registered method's embedded-default recipe and print one results table.

``make demo`` (= ``python -m recipes.demo``) runs each entry of :data:`REGISTRY` in turn. An
entry names a recipe module whose ``demo()`` runs the embedded default (offline, CPU, minutes at
most) and returns ``{metric name: value}``. A method's issue adds its line here.

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

#: name -> (module with a ``demo()`` function, one-line description)
REGISTRY: dict[str, tuple[str, str]] = {
    "example": (
        "recipes.example.train",
        "stock Trainer, tiny ViT on digits (the recipe convention)",
    ),
    "agnostic_sam": (
        "recipes.agnostic_sam.train",
        "Agnostic-SAM, tiny ViT on digits with 40% label noise",
    ),
    "shared_prefix": (
        "recipes.shared_prefix.train",
        "shared-structure prefix tuning: tiny ViT pretrained on digits 0-4, prefixes tuned on 5-9",
    ),
    "bnn_mutual": (
        "recipes.bnn_mutual.train",
        "BNN mutual learning (DML + parameter/feature diversity), two tiny ViT BNNs on digits",
    ),
    "prompt_dsi": (
        "recipes.prompt_dsi.train",
        "PromptDSI: MiniLM DSI on stdlib docstrings, a topic-keyed prompt pool indexes new documents",
    ),
    "hierarchical_cl": (
        "recipes.hierarchical_cl.train",
        "hierarchical-taxonomy prompt CL + OT: frozen tiny ViT, digits as 5 tasks x 2 classes",
    ),
    "fhbi": (
        "recipes.fhbi.train",
        "FHBI: 4 LoRA particles (+ heads) of a tiny ViT on digits, SAM ascent + SVGD repulsion",
    ),
    "pga": (
        "recipes.pga.train",
        "PGA prompt alignment: tiny CLIP (pretrained on digits), digits -> rotated digits UDA",
    ),
    "erasure": (
        "recipes.erasure.train",
        "EAP concept erasure: tiny SD, erase a prompt (xattn), drift, changed-tensors save/reload",
    ),
    "quantization": (
        "recipes.quantization.train",
        "MetaAug PTQ: CNN trained on digits, W4A4 / W2A4 from 128 calibration images",
    ),
    "s2n": (
        "recipes.s2n.sample",
        "S2N scheduler: tiny SD swap vs DDIM (rho 0/1), save/reload, biased-denoiser W1",
    ),
}


Result = Comparison | dict[str, float] | str  # a comparison, bare figures, or the error


def run_entry(name: str) -> Comparison | dict[str, float]:
    module_name, _ = REGISTRY[name]
    return importlib.import_module(module_name).demo()


def _cells(result: Result) -> list[tuple[str, str, str, str]]:
    """(metric, baseline, method, verdict) cells of one entry."""
    if isinstance(result, str):
        return [("FAILED", "", result, "")]
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


def save_figure(rows: list[tuple[str, str, Result, float]], path: Path) -> Path | None:
    """One bar per compared method: its headline metric's gain over the baseline (positive:
    the method is better), labelled with both values. ``None`` when nothing was compared."""
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
        gains.append(result.gain(metric))
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
    axes.set_xlabel("method - baseline on the headline metric (positive: method better)")
    axes.set_title("make demo: each method beside its baseline, on the zoo fixtures")
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
    figure = save_figure(rows, args.figure)
    if figure is not None:
        print(f"\nsummary figure: {figure}")
    return int(any(isinstance(row[2], str) for row in rows))


if __name__ == "__main__":
    sys.exit(main())

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


def run_entry(name: str) -> dict[str, float]:
    module_name, _ = REGISTRY[name]
    return importlib.import_module(module_name).demo()


def format_table(rows: list[tuple[str, str, dict[str, float] | str, float]]) -> str:
    """One line per (method, metric) pair: method | description | metric | value | seconds."""
    lines = [("method", "metric", "value", "time (s)")]
    for name, _, metrics, seconds in rows:
        if isinstance(metrics, str):
            lines.append((name, "FAILED", metrics, f"{seconds:.1f}"))
            continue
        for i, (metric, value) in enumerate(metrics.items()):
            lines.append(
                (name if i == 0 else "", metric, f"{value:.4g}", f"{seconds:.1f}" if i == 0 else "")
            )
    widths = [max(len(row[c]) for row in lines) for c in range(4)]
    rule = "  ".join("-" * w for w in widths)
    text = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in lines]
    return "\n".join([text[0], rule, *text[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(REGISTRY), help="entries to run")
    parser.add_argument("--list", action="store_true", help="list the entries and exit")
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
            metrics: dict[str, float] | str = run_entry(name)
        except Exception as error:  # one failing method must not hide the others' results
            traceback.print_exc()
            metrics = f"{type(error).__name__}: {error}"
        rows.append((name, REGISTRY[name][1], metrics, time.perf_counter() - start))
    print()
    print(format_table(rows))
    return int(any(isinstance(row[2], str) for row in rows))


if __name__ == "__main__":
    sys.exit(main())

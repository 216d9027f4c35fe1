"""Run the benchmarks: ``python -m benchmarks [NAME ...] [--list]`` (``make bench`` runs them all).

Every module of this package with a top-level ``main`` is a benchmark. They run one after another
in this process, each with its default arguments; one that fails is reported and the others still
run, and the exit status is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

from benchmarks.harness import discover_benchmarks


def run_benchmarks(names: list[str]) -> list[dict]:
    """Run each benchmark's ``main([])``; one summary row (name, status, seconds, ratios) each."""
    rows = []
    for name in names:
        print(f"\n### {name}", flush=True)
        start = time.perf_counter()
        try:
            report = importlib.import_module(f"benchmarks.{name}").main([])
        except Exception:  # one broken benchmark must not hide the others' results
            traceback.print_exc()
            status, ratios = "FAILED", {}
        else:
            status, ratios = "ok", dict(getattr(report, "ratios", {}) or {})
        rows.append(
            {
                "name": name,
                "status": status,
                "seconds": time.perf_counter() - start,
                "ratios": ratios,
            }
        )
    return rows


def format_summary(rows: list[dict]) -> str:
    """One line per benchmark: name, status, wall time, ratios."""
    width = max((len(row["name"]) for row in rows), default=4)
    lines = ["== summary =="]
    for row in rows:
        ratios = ", ".join(f"{key}={value:.3f}" for key, value in row["ratios"].items())
        lines.append(
            f"{row['name']:<{width}}  {row['status']:<6}  {row['seconds']:7.1f} s  {ratios}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the chosen benchmarks, return the exit status."""
    available = discover_benchmarks()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {available})")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(available))
        return 0
    unknown = sorted(set(args.names) - set(available))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available}")
    rows = run_benchmarks(args.names or available)
    print("\n" + format_summary(rows))
    return 1 if any(row["status"] != "ok" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

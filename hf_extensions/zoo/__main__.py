"""``python -m hf_extensions.zoo {list,build,check} ...``: build or re-measure zoo fixtures."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hf_extensions.zoo import FIXTURES, fixture_module, zoo_root
from hf_extensions.zoo.building import BuildOptions, read_quality


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_extensions.zoo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the fixtures and whether each is built")
    build = commands.add_parser("build", help="train a fixture and save its folder")
    build.add_argument("name", choices=sorted(FIXTURES))
    build.add_argument("--output_dir", type=Path, help="default: zoo/<name> at the repository")
    build.add_argument("--steps", type=int, help="training steps (default: the fixture's own)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--no_progress", action="store_true", help="no progress bar")
    check = commands.add_parser("check", help="reload a built fixture and re-measure it")
    check.add_argument("name", choices=sorted(FIXTURES))
    check.add_argument("--folder", type=Path, help="default: zoo/<name> at the repository")
    args = parser.parse_args(argv)

    if args.command == "list":
        for name in FIXTURES:
            built = (zoo_root() / name / "quality.json").is_file()
            description = fixture_module(name).DESCRIPTION
            print(f"{name:<14} {'built' if built else 'missing':<8} {description}")
        return 0
    module = fixture_module(args.name)
    if args.command == "build":
        if args.steps is not None and args.steps < 1:
            parser.error(f"--steps must be an integer >= 1, got {args.steps}")
        options = BuildOptions(
            output_dir=args.output_dir or zoo_root() / args.name,
            steps=args.steps,
            seed=args.seed,
            progress=not args.no_progress,
        )
        folder = module.build(options)
        print(json.dumps(read_quality(folder)["quality"], indent=2))
        print(f"saved {folder}")
        return 0
    folder = args.folder or zoo_root() / args.name
    stated = read_quality(folder)["quality"]
    measured = module.evaluate(folder)
    for key, value in stated.items():
        print(f"{key:<32} stated {value:.4f}  measured {measured.get(key, float('nan')):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

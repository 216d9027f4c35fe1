"""Command-line parsing for recipes: YAML file + command-line flags into dataclasses.

Every recipe's ``train.py`` parses its arguments with :class:`RecipeArgumentParser`, an
``HfArgumentParser`` that also reads ``--config path/to/setting.yaml``. Values in the YAML become
the defaults; flags given on the command line override them, so
``accelerate launch recipes/x/train.py --config recipes/x/digits.yaml --learning_rate 1e-3`` works
as users of TRL's and the alignment-handbook's scripts expect. ``--help`` lists every field with
the help text of its dataclass.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml
from transformers import HfArgumentParser

from hf_extensions.checkpoints import resolve_checkpoint, restore_pretrained_weights

logger = logging.getLogger(__name__)


def use_cpu_for_multiprocess_launch() -> bool:
    """Make a multi-process launch on a machine without an accelerator data-parallel over gloo.

    ``accelerate launch --multi_gpu --num_processes N`` (or a multi-GPU config file) starts N
    processes but does not tell them to use the CPU; on a machine with no GPU, Accelerate then
    picks "not distributed" and every process trains alone on its own copy of the data. Setting
    ``ACCELERATE_USE_CPU=true`` before the ``TrainingArguments`` / ``Accelerator`` resolve their
    device gives the intended CPU process group (gloo). Returns whether it was set.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not torch.cuda.is_available() and "ACCELERATE_USE_CPU" not in os.environ:
        os.environ["ACCELERATE_USE_CPU"] = "true"
        logger.info("%d processes and no GPU: using CPU data parallelism (gloo).", world_size)
        return True
    return False


def resume_checkpoint(args, model: torch.nn.Module | None = None) -> str | None:
    """The checkpoint a recipe resumes from, for ``Trainer.train(resume_from_checkpoint=...)``.

    ``args.resume_from_checkpoint``: unset -> ``None``; ``true`` / ``last`` -> the newest
    ``checkpoint-N`` in ``args.output_dir``; else that folder (refused when missing). With
    ``model`` (a ``PreTrainedModel``), its weights are restored through ``from_pretrained``
    first (see :mod:`hf_extensions.checkpoints`: Trainer's own resume misses transformers 5's
    renamed keys).
    """
    path = resolve_checkpoint(getattr(args, "resume_from_checkpoint", None), args.output_dir)
    if path is not None and model is not None:
        restore_pretrained_weights(model, path)
    return path


def refuse_resume(args, recipe: str) -> None:
    """For recipes whose loop is not ``Trainer.train``: refuse ``--resume_from_checkpoint``
    instead of ignoring it silently."""
    if getattr(args, "resume_from_checkpoint", None) not in (None, ""):
        raise ValueError(
            f"`resume_from_checkpoint` is not supported by the {recipe} recipe yet (its loop is "
            "not Trainer.train, so it would be silently ignored); run again without it."
        )


class RecipeArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` with a ``--config`` YAML file whose values the command line overrides."""

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, **kwargs)
        self.add_argument(
            "--config",
            type=str,
            default=None,
            help="YAML file of argument values; flags on the command line override them.",
        )

    def parse(self, argv: Sequence[str] | None = None) -> tuple:
        """Parse ``argv`` (default ``sys.argv[1:]``) into one instance per dataclass."""
        argv = list(sys.argv[1:] if argv is None else argv)
        use_cpu_for_multiprocess_launch()
        pre = argparse.ArgumentParser(add_help=False)
        pre.add_argument("--config", type=str, default=None)
        config_path = pre.parse_known_args(argv)[0].config
        if config_path is not None:
            self._apply_yaml_defaults(Path(config_path))
        *outputs, remaining = self.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True
        )
        if remaining:
            self.error(f"unrecognized arguments: {' '.join(remaining)}")
        # The last output is the namespace left over after the dataclasses: it holds `config`.
        return tuple(outputs[:-1])

    def _apply_yaml_defaults(self, path: Path) -> None:
        if not path.is_file():
            self.error(f"--config {path}: no such file")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            self.error(f"--config {path}: expected a mapping of argument names to values")
        actions = {action.dest: action for action in self._actions}
        unknown = sorted(set(values) - set(actions) - {"config"})
        if unknown:
            self.error(f"--config {path}: unknown argument(s) {unknown}")
        for name in values:
            actions[name].required = False  # given by the file; the command line may still override
        self.set_defaults(**values)

"""The recipe skeleton: parse → build → train/run → finish → summary.

Every ``recipes/<method>/train.py`` has the same shape::

    def main(argv=None):
        args, config = RecipeArgumentParser((ScriptArguments, MethodConfig)).parse(argv)  # parse
        trainer = MethodTrainer(model=build_model(args), args=config, ...)                # build
        run_training(trainer)                                      # resumes when asked to
        return trainer, finish_training(trainer, test_split)       # test metrics, save, card

    def demo():                                          # the embedded default, for `make demo`
        return run_demo(main, RECIPE_DIR / "digits.yaml", SUMMARY)

    if __name__ == "__main__":                 # summary, artifact, how to load it; clean up
        run_as_script(main, SUMMARY, artifacts=lambda result: trainer_artifact(result[0]))

* parse: :class:`RecipeArgumentParser`, an ``HfArgumentParser`` that also reads ``--config
  path/to/setting.yaml``. Values in the YAML become the defaults; flags given on the command line
  override them, so ``accelerate launch recipes/x/train.py --config recipes/x/digits.yaml
  --learning_rate 1e-3`` works as users of TRL's and the alignment-handbook's scripts expect.
  ``--help`` lists every field with the help text of its dataclass.
* train: :func:`run_training` resumes from ``--resume_from_checkpoint`` (see
  :func:`resume_checkpoint`); recipes whose loop is not ``Trainer.train`` call
  :func:`refuse_resume` instead.
* finish: :func:`finish_training` evaluates the test split, saves, and writes (or pushes, one
  commit) the model card, from the main process, then waits at a barrier; recipes with their
  own loop save on the main process and push with :func:`push_folder`.
* summary: :func:`summarize` picks the headline metrics (:data:`CLASSIFICATION_SUMMARY` for the
  classifiers); :func:`run_demo` returns them and :func:`run_as_script` prints them, then where
  the artifact is and the one line of code that loads it (:class:`Artifact`).
* clean-up: :func:`run_as_script` destroys the process group at the end (:func:`end_process_group`).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser

from hf_extensions.checkpoints import resolve_checkpoint, restore_pretrained_weights
from hf_extensions.hub import Usage, save_model_card, usage_for

#: The headline metrics of a classification recipe: label -> key of the test metrics.
CLASSIFICATION_SUMMARY: dict[str, str] = {
    "test accuracy": "test_accuracy",
    "test NLL": "test_nll",
    "test ECE": "test_ece",
}

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


def process_state():
    """Accelerate's ``PartialState`` of this process, honouring ``ACCELERATE_USE_CPU`` as
    ``AcceleratorState`` and ``TrainingArguments`` do.

    A bare ``PartialState()`` ignores that variable: on a machine without a GPU, the processes
    of ``accelerate launch --multi_gpu`` (or ``--config_file cpu_2proc.yaml``) then each see a
    single-process run in which they are the main process, and all of them write. Recipes that
    decide who writes with no ``Trainer`` or ``Accelerator`` in hand ask this one.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


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


def run_training(trainer):
    """The train step of a recipe built on a ``Trainer``: ``trainer.train``, resuming from
    ``trainer.args.resume_from_checkpoint`` (see :func:`resume_checkpoint`). Returns ``trainer``."""
    # a MethodTrainer restores a resumed model's weights itself; a stock Trainer needs them here
    model = None if hasattr(trainer, "finish") else trainer.model
    trainer.train(resume_from_checkpoint=resume_checkpoint(trainer.args, model))
    return trainer


def finish_training(
    trainer,
    test_dataset=None,
    *,
    dataset: str | None = None,
    card: Callable[[dict[str, float]], Any] | None = None,
) -> dict[str, float]:
    """The finish step of a recipe built on a ``Trainer``: evaluate the test split, then save
    the model and write its card, or push model and card in one commit (``args.push_to_hub``).

    Only the main process writes and pushes (``Trainer.save_model`` / ``push_to_hub`` see to
    it); every process waits at a barrier until the artifact is complete. ``save_model`` is not
    called before ``push_to_hub``: with ``push_to_hub`` set it would push a commit of its own.

    Args:
        trainer (`transformers.Trainer`):
            The trained trainer. A method trainer (:class:`trainers.MethodTrainer`, one with
            ``card_hyperparameters``) writes its own card.
        test_dataset (`datasets.Dataset`, *optional*):
            Evaluated once, metrics prefixed ``test_``; ``None`` skips the evaluation.
        dataset (`str`, *optional*):
            The dataset's name for a method trainer's card (a Hub id or a description).
        card (`Callable[[dict], ModelCard]`, *optional*):
            A stock ``Trainer``'s card, built from the test metrics. It is also the pushed card:
            ``Trainer.push_to_hub`` would otherwise replace it with transformers' own.

    Returns:
        `dict[str, float]`: the test metrics (empty without ``test_dataset``).
    """
    metrics = {}
    if test_dataset is not None:
        metrics = trainer.evaluate(test_dataset, metric_key_prefix="test")
    if hasattr(trainer, "card_hyperparameters"):  # a method trainer: its own card
        if trainer.args.push_to_hub:
            trainer.push_to_hub(dataset=dataset)  # saves, writes the card, one commit
        else:
            trainer.save_model()
            trainer.create_model_card(dataset=dataset)
    else:
        model_card = card(metrics) if card is not None else None

        def write_card(**_ignored) -> None:
            if model_card is not None and trainer.is_world_process_zero():
                save_model_card(model_card, trainer.args.output_dir)

        if trainer.args.push_to_hub:
            # Trainer.push_to_hub writes its card with `create_model_card` before uploading
            # `output_dir`: for this one call, that card is ours.
            trainer.create_model_card = write_card
            try:
                trainer.push_to_hub()
            finally:
                del trainer.create_model_card
        else:
            trainer.save_model()
            write_card()
    trainer.accelerator.wait_for_everyone()
    return metrics


#: The subfolder of an adapter artifact that holds the model the adapter is applied to.
BASE_MODEL_FOLDER = "base_model"


def save_base_model(output_dir: str | os.PathLike, *objects) -> str:
    """Save the model an adapter artifact applies to (and its tokenizer or processor, if
    given) in ``output_dir/base_model``, from the main process; every process waits for it.

    For the recipes that build their backbone (a tiny model from a config, pretrained here, or
    a checkpoint with a new head): without it the saved adapter cannot be reloaded in a fresh
    process. The folder becomes the model's ``name_or_path``, which PEFT records as an
    adapter's ``base_model_name_or_path`` (instead of null). Returns the folder.
    """
    folder = str(Path(output_dir) / BASE_MODEL_FOLDER)
    state = process_state()
    if state.is_main_process:
        for item in objects:
            item.save_pretrained(folder)
    if objects and hasattr(objects[0], "name_or_path"):
        objects[0].name_or_path = folder
    state.wait_for_everyone()
    return folder


def push_folder(folder: str | os.PathLike, repo_id: str, commit_message: str) -> str:
    """Upload ``folder`` to the Hub repository ``repo_id`` (created if missing) in one commit,
    from the main process only; every process waits until it is done. Returns the repo id."""
    from huggingface_hub import HfApi

    state = process_state()
    if state.is_main_process:
        api = HfApi()
        repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    state.wait_for_everyone()
    return repo_id


@dataclass(frozen=True)
class Artifact:
    """What a recipe leaves behind, for the summary :func:`run_as_script` prints.

    Attributes:
        path: the folder it was saved to.
        usage: how to load and run it (:class:`hf_extensions.hub.Usage`; its one-line form is
            printed).
        hub_id: the Hub repository it was pushed to, if it was.
    """

    path: str
    usage: Usage
    hub_id: str | None = None


def artifact_id(args) -> str:
    """Where the artifact of a run with ``args`` (``output_dir``, ``push_to_hub``,
    ``hub_model_id``) is found: its Hub repository when it is pushed, else ``output_dir``.
    The name a model card's usage snippet loads."""
    if getattr(args, "push_to_hub", False):
        return args.hub_model_id or Path(args.output_dir).name  # Trainer's default repository
    return str(args.output_dir)


def trainer_artifact(trainer, usage: Callable[[str], Usage] | None = None) -> Artifact:
    """The :class:`Artifact` of a ``Trainer`` recipe: ``output_dir``, pushed to the trainer's
    Hub repository with ``push_to_hub``; ``usage(path)`` defaults to the method's snippet
    (:func:`hf_extensions.hub.usage_for`)."""
    path = str(trainer.args.output_dir)
    hub_id = None
    if trainer.args.push_to_hub:
        hub_id = getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id
    if usage is None:
        return Artifact(path, usage_for(trainer.method, path), hub_id)
    return Artifact(path, usage(path), hub_id)


def print_artifacts(artifacts: Artifact | Sequence[Artifact]) -> None:
    """Print where each artifact is and the one line of code that loads it."""
    for artifact in [artifacts] if isinstance(artifacts, Artifact) else artifacts:
        pushed = f" and pushed to {artifact.hub_id}" if artifact.hub_id else ""
        print(f"Saved to {artifact.path}{pushed} (its README.md has a usage example). Load it:")
        print(f"    {artifact.usage.one_line}")


def summarize(
    result: Any, summary: Mapping[str, str] | Callable[[Any], dict], strict: bool = True
) -> dict[str, float]:
    """The headline figures of a recipe's result.

    Args:
        result (`tuple` or `dict`):
            What the recipe's ``main`` returned: ``(trainer_or_models, metrics)`` or a dict.
        summary (`Mapping[str, str]` or `Callable`):
            Label -> metric key, or a function of ``result`` returning ``{label: value}``.
        strict (`bool`, *optional*, defaults to `True`):
            Refuse a metric key the result lacks (``KeyError``); otherwise skip it.

    Returns:
        `dict[str, float]`: label -> value.
    """
    if callable(summary):
        return summary(result)
    metrics = result[1] if isinstance(result, tuple) else result
    missing = [key for key in summary.values() if key not in metrics]
    if missing and strict:
        raise KeyError(
            f"summary: the recipe returned no metric {missing}; it has {sorted(metrics)}."
        )
    return {label: float(metrics[key]) for label, key in summary.items() if key in metrics}


def run_demo(
    main: Callable[[list[str]], Any],
    config: str | os.PathLike,
    summary: Mapping[str, str] | Callable[[Any], dict],
    *flags: str,
) -> dict[str, float]:
    """A recipe's embedded default for ``make demo``, run into a temporary ``output_dir``.

    Args:
        main (`Callable[[list[str]], Any]`):
            The recipe's ``main``, called with ``--config config --output_dir <tmp> *flags``.
        config (`str` or `os.PathLike`):
            The setting's YAML file.
        summary (`Mapping[str, str]` or `Callable`):
            The headline figures, as :func:`summarize` takes them (strictly: all must exist).
        *flags (`str`):
            Command-line overrides, e.g. ``"--num_train_epochs", "3"``.

    Returns:
        `dict[str, float]`: the summary's figures.
    """
    with tempfile.TemporaryDirectory() as output_dir:
        result = main(["--config", str(config), "--output_dir", output_dir, *flags])
        return summarize(result, summary)


def end_process_group(*holders) -> None:
    """Before a launched process exits: drop the data-parallel wrappers, then destroy the
    default process group, if any (what ``Accelerator.end_training`` does, and more).

    ``holders``: the ``Trainer`` and ``Accelerator`` objects of the run; their DDP-wrapped
    models (``Trainer.model_wrapped``, the accelerator's prepared objects) are released.
    Measured on torch 2.13 (CPU, gloo, 2 processes, 20 DDP steps): with the
    ``DistributedDataParallel`` model alive at exit, 3 launches in 85 had a process abort after
    its last line ("terminate called without an active exception", SIGABRT) although the process
    group was destroyed, failing the launch; with the wrapper released first, 0 in 100.
    """
    for holder in holders:
        if hasattr(holder, "model_wrapped"):  # a Trainer
            holder.model_wrapped = holder.model
        accelerator = getattr(holder, "accelerator", holder)
        if hasattr(accelerator, "free_memory"):
            accelerator.free_memory()
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_as_script(
    main: Callable[[list[str]], Any],
    summary: Mapping[str, str] | Callable[[Any], dict] | None = None,
    argv: Sequence[str] | None = None,
    artifacts: Callable[[Any], Artifact | Sequence[Artifact]] | None = None,
) -> Any:
    """``if __name__ == "__main__": run_as_script(main, SUMMARY, artifacts=...)``: run
    ``main``; on the main process print the summary, where the artifact is and the line that
    loads it; then :func:`end_process_group` with the result's trainer.

    Args:
        main (`Callable[[list[str]], Any]`):
            The recipe's ``main``.
        summary (`Mapping[str, str]` or `Callable`, *optional*):
            The figures to print, as :func:`summarize` takes them (missing ones are skipped).
        argv (`Sequence[str]`, *optional*):
            The arguments; defaults to ``sys.argv[1:]``.
        artifacts (`Callable`, *optional*):
            ``result -> Artifact`` (or a list of them): what :func:`print_artifacts` prints.

    Returns:
        What ``main`` returned.
    """
    result = main(list(sys.argv[1:] if argv is None else argv))
    if int(os.environ.get("RANK", "0")) == 0:
        if summary is not None:
            for label, value in summarize(result, summary, strict=False).items():
                print(f"{label}: {value:.4g}")
        if artifacts is not None:
            print_artifacts(artifacts(result))
    parts = result if isinstance(result, tuple) else (result,)
    end_process_group(*(part for part in parts if hasattr(part, "accelerator")))
    return result

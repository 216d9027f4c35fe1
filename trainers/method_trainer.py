"""Base of every hf-extensions ``Trainer``: the method's logged metrics and its model card."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import ClassVar

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_extensions.checkpoints import (
    TRAINER_STATE,
    checkpoint_problem,
    resolve_checkpoint,
    restore_pretrained_weights,
)
from hf_extensions.distributed import require_process_group
from hf_extensions.hub import build_model_card, save_model_card

logger = logging.getLogger(__name__)


class MethodTrainer(Trainer):
    """A ``Trainer`` that logs a method's own metrics and writes an hf-extensions model card.

    Subclasses set :attr:`method` (the card's lower-case method id), :attr:`paper` and
    :attr:`arxiv_id`, take a :class:`trainers.method_config.MethodConfig` as ``args``, and call
    :meth:`record` during training; the values are averaged over the steps since the last log
    (and over processes) and added to the training logs.
    """

    method: ClassVar[str] = ""
    paper: ClassVar[str | None] = None
    arxiv_id: ClassVar[str | None] = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        require_process_group(self.accelerator.num_processes, type(self).__name__)
        self._metrics: dict[str, list[torch.Tensor]] = defaultdict(list)
        if self.args.fp16 and not self.accelerator.native_amp and not self.is_deepspeed_enabled:
            # accelerate >= 1.16 sets up no float16 autocast and no GradScaler on a device without
            # fp16 support (the CPU) and trains in float32 without a word; earlier releases refuse.
            logger.warning(
                "fp16=True, but accelerate set up no float16 autocast or loss scaling on %s: this "
                "run trains in float32. Use bf16=True on a CPU, or run fp16 on a GPU.",
                self.accelerator.device,
            )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``Trainer.train``, resuming from the newest *complete* checkpoint for ``True`` /
        ``"last"`` (incomplete ones are skipped with a warning; a named incomplete one is
        refused); a resumed ``PreTrainedModel`` first gets the checkpoint's weights through
        ``from_pretrained`` (Trainer's own resume misses transformers 5's renamed keys). See
        :mod:`hf_extensions.checkpoints`."""
        path = resolve_checkpoint(
            resume_from_checkpoint, self.args.output_dir, self.checkpoint_problem
        )
        if path is not None:
            restore_pretrained_weights(self.accelerator.unwrap_model(self.model), path)
        return super().train(path, *args, **kwargs)

    def checkpoint_problem(self, folder: Path) -> str | None:
        """What makes ``folder`` unusable to resume this run (``None``: complete); see
        :func:`hf_extensions.checkpoints.checkpoint_problem`."""
        return checkpoint_problem(
            folder, world_size=self.args.world_size, model_only=self.args.save_only_model
        )

    def _save_checkpoint(self, model, trial) -> None:
        """``Trainer._save_checkpoint`` (private, transformers 5.25; pinned in
        ``tests/test_upstream_internals.py``), after deleting the ``trainer_state.json`` of a
        ``checkpoint-N`` folder it is about to write again (a run resumed from an earlier
        checkpoint re-saves step N): a save cut short then reads as incomplete, not as the old
        checkpoint with some of the new files; then :meth:`save_resume_state`. Uses
        ``Trainer._get_output_dir`` (private)."""
        if self.args.should_save:
            run_dir = Path(self._get_output_dir(trial=trial))
            folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            (folder / TRAINER_STATE).unlink(missing_ok=True)
            self.save_resume_state(folder)
        super()._save_checkpoint(model, trial)

    def save_resume_state(self, folder: Path) -> None:
        """Files besides Trainer's that this method needs to resume exactly, written into the
        checkpoint ``folder`` before Trainer's own (so that ``trainer_state.json``, written last,
        still marks a finished save); called on the saving process. None by default."""

    def record(self, **values: torch.Tensor | float) -> None:
        """Add values to the averages logged at the next logging step."""
        for name, value in values.items():
            # host: a Python float stays on the host until the log step averages it
            self._metrics[name].append(torch.as_tensor(value, dtype=torch.float32).detach())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averages of :meth:`record`'s values (over steps and processes) to training logs."""
        if "loss" in logs and self._metrics:
            for name, values in self._metrics.items():
                device = self.accelerator.device
                mean = torch.stack([v.to(device) for v in values]).mean()
                logs[name] = round(float(self.accelerator.reduce(mean, reduction="mean")), 6)
            self._metrics.clear()
        super().log(logs, start_time)

    def card_hyperparameters(self) -> dict:
        """What the model card records as hyper-parameters (the config's method settings)."""
        return self.args.method_hyperparameters()

    def card_base_model(self) -> str | None:
        """The model the run started from, as the model's config names it."""
        model = self.accelerator.unwrap_model(self.model)
        return getattr(getattr(model, "config", None), "_name_or_path", None) or None

    def create_model_card(
        self,
        model_name: str | None = None,
        tags=None,
        dataset=None,
        finetuned_from: str | None = None,
        license: str | None = None,
        **kwargs,
    ):
        """Write ``README.md`` in ``output_dir``: the method, its settings, the last eval metrics.

        ``push_to_hub`` calls this before uploading, so the pushed card is this one. The base
        model is ``finetuned_from``, else the model's ``name_or_path`` unless that is a local
        folder (which is no Hub id and would leak a local path into a public card).
        """
        if not self.is_world_process_zero():
            return
        metrics: dict[str, float] = {}
        for entry in self.state.log_history:
            metrics.update(
                {k: float(v) for k, v in entry.items() if k.startswith(("eval_", "test_"))}
            )
        base = finetuned_from or self.card_base_model()
        if not base or os.path.isdir(base):
            base = None
        card = build_model_card(
            method=self.method,
            paper=self.paper,
            arxiv_id=self.arxiv_id,
            hyperparameters=self.card_hyperparameters(),
            metrics=metrics,
            base_model=base,
            tags=[tags] if isinstance(tags, str) else list(tags or []),
            datasets=[dataset] if isinstance(dataset, str) else list(dataset or []),
            model_name=model_name,
            license=license,
            artifact=(getattr(self, "hub_model_id", None) or self.args.hub_model_id)
            if self.args.push_to_hub
            else self.args.output_dir,
        )
        save_model_card(card, self.args.output_dir)

    def finish(self, test_dataset=None, dataset: str | None = None) -> dict[str, float]:
        """End of a recipe: evaluate on ``test_dataset`` (metrics prefixed ``test_``), then save
        the model and write its card, or push model and card as one commit when
        ``args.push_to_hub`` (:func:`hf_extensions.cli.finish_training`)."""
        from hf_extensions.cli import finish_training

        return finish_training(self, test_dataset, dataset=dataset)

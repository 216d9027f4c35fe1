"""Base of every hf-extensions ``Trainer``: the method's logged metrics and its model card."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import ClassVar

import torch
from transformers import Trainer

from hf_extensions.checkpoints import resolve_checkpoint, restore_pretrained_weights
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
        """``Trainer.train``; a resumed ``PreTrainedModel`` first gets the checkpoint's weights
        through ``from_pretrained`` (Trainer's own resume misses transformers 5's renamed keys:
        see :mod:`hf_extensions.checkpoints`)."""
        path = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if path is not None:
            restore_pretrained_weights(self.accelerator.unwrap_model(self.model), path)
        return super().train(path, *args, **kwargs)

    def record(self, **values: torch.Tensor | float) -> None:
        """Add values to the averages logged at the next logging step."""
        for name, value in values.items():
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
        )
        save_model_card(card, self.args.output_dir)

    def finish(self, test_dataset=None, dataset: str | None = None) -> dict[str, float]:
        """End of a recipe: evaluate on ``test_dataset`` (metrics prefixed ``test_``), save the
        model, and write its card, or push model and card when ``args.push_to_hub``."""
        metrics = {}
        if test_dataset is not None:
            metrics = self.evaluate(test_dataset, metric_key_prefix="test")
        self.save_model()
        if self.args.push_to_hub:
            self.push_to_hub(dataset=dataset)  # writes the model card first
        else:
            self.create_model_card(dataset=dataset)
        return metrics

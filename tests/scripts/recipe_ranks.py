"""Run a recipe and report, from every rank, the final parameters (for the DDP tests).

python tests/scripts/recipe_ranks.py recipes.example.train --config ... [recipe flags]
"""

import importlib
import sys

from hf_extensions.cli import end_process_group
from hf_extensions.testing.distributed import report

if __name__ == "__main__":
    recipe = importlib.import_module(sys.argv[1])
    trainer, metrics = recipe.main(sys.argv[2:])
    model = trainer.accelerator.unwrap_model(trainer.model)
    report(
        {
            "num_processes": trainer.accelerator.num_processes,
            "process_index": trainer.accelerator.process_index,
            "global_step": trainer.state.global_step,
            "test_accuracy": metrics["test_accuracy"],
            "train_loss": next(
                h["train_loss"] for h in trainer.state.log_history if "train_loss" in h
            ),
        },
        {name: p for name, p in model.named_parameters()},
    )
    end_process_group(trainer)  # before exit: see hf_extensions.cli.end_process_group

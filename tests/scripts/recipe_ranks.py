"""Run the example recipe and report, from every rank, the final parameters (for the DDP test)."""

import sys

from hf_extensions.testing.distributed import report
from recipes.example.train import main

if __name__ == "__main__":
    trainer, metrics = main(sys.argv[1:])
    model = trainer.accelerator.unwrap_model(trainer.model)
    report(
        {
            "num_processes": trainer.accelerator.num_processes,
            "process_index": trainer.accelerator.process_index,
            "global_step": trainer.state.global_step,
            "test_accuracy": metrics["test_accuracy"],
        },
        {name: p for name, p in model.named_parameters()},
    )
